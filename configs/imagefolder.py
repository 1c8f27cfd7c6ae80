"""SPCL on your own folder of images, labelled or not: the config fits itself to the data once it is listed.

    python launch.py --config configs/imagefolder.py --config.dataset_path=/path/to/folder

Layout: labelled, folder/train/<class>/<image> plus folder/val/<class>/<image> (or test/), the test set; or
unlabeled, folder/train/<image> with no class folders, for pretraining only (val/ and test/ are then not read
and evaluate_after_pretrain is turned off: the linear and kNN classifiers train on labelled train images).
`infer_from_data` sets n_classes and pre_classes (0 here) to every class folder found, and lowers
num_prototypes (to at least 39 pretraining images per prototype), batch_size (to the pretrain set, in multiples
of the device count) and warmup_epochs (to a tenth of n_epochs) where the data is too small for them; the
start-up log says what it chose and why (`infer_from_data: ...`) and how many images pretraining uses. No
images are held out of train/ (val_sample=0: small classes keep all their images; val/ is the test set).
96 px crops with the ImageNet stem (photos of any size), ResNet-18, 200 epochs; any option can be overridden.
Hardware: one GPU (add --config.dtype=bfloat16). Expected time and accuracy depend on the folder: not measured.
"""
from configs import default


def get_config():
    config = default.get_config()
    config.dataset = 'imagefolder'
    config.infer_from_data = True
    config.n_classes = 0
    config.pre_classes = 0
    config.val_sample = 0
    config.image_size = 96
    config.stem = 'imagenet'
    config.n_epochs = 200
    return config
