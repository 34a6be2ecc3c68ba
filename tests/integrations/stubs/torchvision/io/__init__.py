"""``torchvision.io``: transformers' video_utils imports the module at module level when it sees a torchvision;
the text-only paths the tests run never decode images or video, so nothing here is implemented."""


def __getattr__(name: str):
    raise AttributeError(
        f"torchvision.io.{name} is not part of the fastcontrast test stub (see tests/integrations/stubs/README.md)"
    )
