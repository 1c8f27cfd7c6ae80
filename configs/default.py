"""Every option of spcl_jax, with the original SPCL `config.conf` recipe as defaults.

Not meant to be run directly: each dataset config (`configs/<dataset>.py`) starts from this one and
overrides only its deltas. Options keep the names of the original command line (DIFFERENCES.md, options) so its
users find them (`--config.batch_size`, `--config.num_prototypes`, ...). Where the original code does
something other than intended (bug ids B-n of DIFFERENCES.md, which lists every difference), the corrected behaviour is the default and a
switch reproduces the as-written one.
"""
import ml_collections
from ml_collections import config_dict


def get_config():
    c = ml_collections.ConfigDict()

    # ---- what to run ----
    c.mode = "pretrain"  # pretrain (then evaluation unless `evaluate_after_pretrain` is off) | linear_eval | knn_eval
    c.method = "spcl"  # spcl | simclr | cluster | metric | supervised (the original's flags map here, see README)
    # The original's method flags; unset by default. When any is set they choose `method` as main.py did:
    # supervised -> supervised; clustering_use+metric_learn -> spcl; only clustering_use -> cluster;
    # only metric_learn -> metric; neither -> simclr.
    c.clustering_use = config_dict.placeholder(bool)  # original flag: prototype CE loss
    c.metric_learn = config_dict.placeholder(bool)  # original flag: siamese metric loss on prototype pairs
    c.supervised = config_dict.placeholder(bool)  # original flag: supervised training on labels
    c.finetune = False  # original flag: linear evaluation only, from load_checkpoint_dir (same as mode=linear_eval)
    c.eval_disent = False  # original flag: SVM probe on random halves of a checkpoint's frozen features (DIFFERENCES.md, eval_disent)
    c.seed = 420  # global seed (the original's), drives init, augmentation, k-means and pair sampling; 0 to 2**32 - 1
    #   (JAX keeps 32 bits of a seed: 2**32 would repeat seed 0; numpy refuses negative seeds)

    # ---- data ----
    c.dataset = "cifar10"  # digits | cifar10 | cifar100 | stl10 | imagenet | imagenet100 | tinyimagenet | imagefolder
    c.dataset_path = ""  # root of an image folder (imagenet/imagenet100/tinyimagenet/imagefolder)
    c.data_dir = ""  # tensorflow-datasets data dir ("" = the tfds default, ~/tensorflow_datasets)
    c.image_size = 32  # crop size S fed to the network; at least its downsampling: 8 (cifar stem), 32 (imagenet stem)
    c.n_classes = 10  # classes in train/valid/test (linear evaluation); 0 = every class of the data (infer_from_data)
    c.pre_classes = 10  # classes whose images form the pretrain set; 0 = every class of the data (infer_from_data)
    c.infer_from_data = False  # once the data is listed, set n_classes and pre_classes left at 0, and lower
    #   num_prototypes, batch_size, warmup_epochs and evaluate_after_pretrain to what the data allows, logging the
    #   choices (configs/imagefolder.py: own folders); a resume infers the same
    c.train_sample = -1  # train/pretrain images per class; -1 = all (standard protocol; the original used 100, B-11)
    c.val_sample = 20  # validation images per class, held out of train
    c.imagenet100_classes = "first100"  # first100 (the original's: first 100 wnids) | cmc (the CMC paper's list)
    c.pretrain_sampling = "permutation"  # permutation (no replacement) | weighted_replacement (as written, B-15)
    c.skip_bad_images = False  # skip undecodable files in image folders with a warning instead of stopping
    c.num_workers = -1  # input worker processes decoding images ahead of the step; -1 = usable cores - 1; 0 = none

    # ---- augmentation (DIFFERENCES.md, augmentation recipes) ----
    c.jitter_d = 1.0  # colour-jitter strength d: (0.8d, 0.8d, 0.8d, 0.2d); 0 to 2.5 (a hue shift 0.2d of at most half a turn, as torchvision)
    c.jitter_p = 0.8  # probability of colour jitter
    c.grey_p = 0.2  # probability of grayscale
    c.blur_sigma = (0.1, 2.0)  # Gaussian blur sigma range
    c.blur_p = 0.5  # probability of blur (datasets the original blurs: imagenet, imagenet100)
    c.blur = False  # whether this dataset's pretrain views are blurred (set by the dataset configs)
    c.crop_scale = (0.08, 1.0)  # random-resized-crop scale range (low, high): 0 < low <= high <= 1, fractions of the image
    c.hflip_p = 0.5  # horizontal-flip probability (0.5 as the original; digits turn it off: a flip changes a digit)
    c.aug_order = "colour_first"  # colour_first (as the original) | crop_first (SimCLR order)
    c.no_twocrop = False  # original flag; must stay False (every pretraining method needs two views)
    c.asymmetric_first_view = False  # as written (B-7): the first view of simclr, and of both images of metric, is the eval view

    # ---- model ----
    c.model = "resnet18"  # resnet18 | resnet34 | resnet50 | resnet101 | resnet152
    c.stem = "auto"  # auto (cifar stem for 32-64 px datasets) | cifar | imagenet
    c.width_multiplier = 1.0  # channel width multiplier (narrow networks for CPU runs)
    c.proj_dim = 128  # projection head output width
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters and BatchNorm statistics stay float32)
    c.remat = "none"  # none | block: recompute each residual block in the backward pass (bigger batches fit)
    c.dip_proj = False  # original flag for the dead DIP head (DIFFERENCES.md, B-24); not ported, must stay False
    c.dip_weight = 1e-2  # original flag for the dead DIP loss; unused
    c.encoder_bn_mode = "train"  # train | frozen_init_stats (as written, B-4: encoder BN stuck at init stats)

    # ---- losses ----
    c.temperature = 0.5  # NT-Xent temperature tau; 0.01 to 10 (SimCLR sweeps 0.05 to 1 and uses 0.5, CLIP stops at 0.01;
    #   the loss grows as 1/tau: 1e-8 diverges to ~4e14)
    c.contras_weight = 1.0  # lambda_c, NT-Xent weight
    c.cluster_weight = 1.0  # lambda_p, prototype classification weight
    c.metric_weight = 1.0  # lambda_m, siamese metric weight
    c.cluster_loss = "CE"  # CE | SCE (symmetric cross-entropy, alpha 0.1, beta 1.0)
    c.metric_loss = "BCE"  # BCE | L1 | L2
    c.prototype_classifier_width = "num_prototypes"  # num_prototypes | n_classes (as written, B-1; needs K <= n_classes)

    # ---- prototypes ----
    c.clustering = "Kmeans"  # clustering algorithm; Kmeans is the only one (the original's PIC never existed)
    c.num_prototypes = 512  # K, number of k-means prototypes; 2 to the pretrain set size N, N - 1 for spcl and metric
    #   (their positive pairs need a prototype with two images)
    c.kmeans_iters = 20  # Lloyd iterations per clustering
    c.kmeans_init = "random"  # random (K distinct points, faiss default) | kmeans++
    c.pca_dim = 256  # PCA-whitening output dim before k-means (min with D); 0 = off
    c.pca_eigen_floor = 1e-5  # raise eigenvalues below this x the largest before ^-1/2; 0 = none, as faiss; < 1 (1 = no whitening)
    c.reassign = 1  # re-cluster every `reassign` epochs (the original accepted and ignored it)
    c.classifier_init_freq = 1  # re-initialise the prototype classifier every this many epochs
    c.cluster_feature_view = "augmented"  # augmented (the original's choice, B-8) | eval (clean view, DeepCluster)
    c.feature_pass_order = "dataset"  # dataset | sampler (as written, B-3: features in sampler order, labels misaligned)
    c.rebuild_member_table = True  # rebuild cluster->members from pseudo labels (False = as written, B-2: ground-truth class
    #   buckets drawn from [0, K); with spcl and metric it needs pre_classes >= 2)
    c.pair_sampling = "exact_half"  # exact_half (B/2 positives per batch) | bernoulli (as written, B-9: coin per pair)

    # ---- optimisation ----
    c.n_epochs = 1000  # pretraining epochs E
    c.warmup_epochs = 10  # linear warmup epochs W
    c.batch_size = 512  # global batch B (pairs for spcl/metric, images otherwise)
    c.learning_rate = 1.0  # peak lr of warmup+cosine (unscaled, as the original); classifier SGD uses lr*B/256
    c.weight_decay = 1e-6  # weight decay of the pretraining optimiser and the classifier SGD; in [0, 1) (published: 1e-6 to 0.1;
    #   1 at lr 1 zeroes the weights every step)
    c.optimiser = "lars"  # lars | sgd | adam
    c.lars_mode = "simclr"  # simclr (bias/norm excluded from decay and trust ratio) | as_written (B-5)
    c.lars_eta = 1e-3  # LARS trust coefficient
    c.momentum = 0.9  # momentum of LARS/SGD (Nesterov); in [0, 1) (1 never forgets a gradient)
    c.lr_stepping = "epoch"  # epoch (piecewise constant, as the original) | step
    c.epoch0_zero_lr = False  # as written (B-6): epoch 0 runs at lr ~ 1e-13
    c.no_warmup_peak = "unscaled"  # warmup_epochs=0: cosine from learning_rate | scaled (as written, B-6: lr*B/256)
    c.patience = 100  # original option: logs epochs without train-loss improvement (never stops)
    c.grad_clip_norm = 0.0  # global gradient-norm clip; 0 = off
    c.divergence_factor = 20.0  # stop when a logged mean loss exceeds this multiple of the run's first-step loss
    #   (a finite explosion; a non-finite loss or gradient always stops); 0 = off

    # ---- evaluation ----
    c.evaluate_after_pretrain = True  # run linear and kNN evaluation after pretraining, as the original
    c.linear_eval_protocol = "original"  # original (augmented crops every epoch, DIFFERENCES.md, linear evaluation) | fast (cached features)
    c.finetune_epochs = 100  # linear-evaluation epochs (0 = no linear head, kNN only)
    c.finetune_learning_rate = 0.1  # linear-eval lr (x B/256)
    c.finetune_weight_decay = 0.0  # linear-eval weight decay; in [0, 1), as weight_decay
    c.finetune_optimiser = "sgd"  # sgd | lars
    c.finetune_batch_size = 512  # linear-eval batch size
    c.knn_k = 200  # neighbours of the kNN classifier
    c.knn_temperature = 0.07  # kNN vote temperature (InstDisc protocol, as solo-learn); 0.02 to 10 (the vote weights
    #   exp(1/T) overflow float32 below T = 0.012)
    c.knn_every_epochs = 0  # during pretraining, kNN top-1 on valid (test without one) every N epochs; 0 = off
    c.eval_random_init_baseline = False  # also evaluate the same encoder at random initialisation
    c.eval_metric_weighting = "sample"  # sample | batch (as written, B-17: unweighted mean over batches of batch_size)
    c.load_checkpoint_dir = ""  # checkpoint directory for linear_eval / knn_eval
    c.checkpoint_step = -1  # step to restore (-1 = newest)

    # ---- logging, checkpoints, runtime ----
    c.log_every_steps = 10  # metrics.jsonl/TensorBoard cadence (steps)
    c.verbose = False  # original flag: debug-level log output
    c.visual_cls = False  # write a 2-D scatter of features coloured by pseudo label (and by ground truth)
    c.visual_freq = 1  # draw it at the clusterings of epochs 1, 1 + visual_freq, 1 + 2*visual_freq, ...
    c.debug = False  # original flag: eval_disent uses only the first 32 samples of each split
    c.checkpoint_every_steps = 0  # extra save every N steps (0 = only at epoch ends)
    c.keep_checkpoints = 2  # newest checkpoints to keep, 2..1000: the newest is confirmed healthy only by the next
    #   step's loss, so one more is kept for a divergence to fall back to
    c.overwrite_checkpoints = False  # start fresh in a workdir whose checkpoints belong to another config
    c.no_distributed = False  # original flag: never call jax.distributed.initialize
    c.gpu_id = ""  # original flag: sets CUDA_VISIBLE_DEVICES before JAX starts ("" = leave as is)
    c.compilation_cache_dir = "~/.cache/spcl_jax/xla"  # JAX's persistent compilation cache ("" = off)
    c.listing_cache_dir = "~/.cache/spcl_jax/listings"  # image-folder listings by (path, mtime, count) ("" = off)
    c.records_cache_dir = "~/.cache/spcl_jax/records"  # each host's copy of a gs:// dataset_path of prepared records
    c.max_steps_per_epoch = -1  # cap on train steps per epoch (tests and smoke runs); -1 = full epoch
    return c
