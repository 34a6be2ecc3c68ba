"""Names imported at module level by open_clip_train.data; never used by the tests."""


class ImageFolder:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("torchvision test stub: datasets.ImageFolder is not available")
