"""What each pretraining method trains on and with, resolved once from the config.

The code asks a `Method` (does it train on pairs? cluster? keep a prototype classifier?) instead of
comparing method names. `resolve` maps the original's method flags onto a method as its main.py
dispatched them (DIFFERENCES.md, methods); `config_validation.method_of(config)` calls it with the config's.
"""
import dataclasses

MODES = ("pretrain", "linear_eval", "knn_eval")  # mode: pretrain (then evaluate), or evaluate a checkpoint


@dataclasses.dataclass(frozen=True)
class Method:
    """A pretraining method.

    pairs: items are pairs of images (A, B), the same or different prototypes, with the siamese metric loss.
    clustering: k-means prototypes (pseudo labels) every `reassign` epochs.
    prototype_classifier: a per-epoch Linear D->K classifier trained on the pseudo labels.
    supervised: cross-entropy of a linear head on ground-truth labels; no projection, no contrastive loss.
    first_view_clean_as_written: the original leaves the first view of every image clean (B-7).
    """

    name: str
    pairs: bool = False
    clustering: bool = False
    prototype_classifier: bool = False
    supervised: bool = False
    first_view_clean_as_written: bool = False

    @property
    def contrastive(self) -> bool:
        """Trains with NT-Xent on two views of each image."""
        return not self.supervised

    @property
    def image_sets(self) -> tuple[str, ...]:
        """The image sets of an item: ("a", "b") for pairs, ("a",) otherwise."""
        return ("a", "b") if self.pairs else ("a",)

    @property
    def source_split(self) -> str:
        """The split it trains on: the labelled train split when supervised, the pretrain split otherwise."""
        return "train" if self.supervised else "pretrain"


METHODS = {
    "spcl": Method("spcl", pairs=True, clustering=True, prototype_classifier=True),
    "simclr": Method("simclr", first_view_clean_as_written=True),
    "cluster": Method("cluster", clustering=True, prototype_classifier=True),
    "metric": Method("metric", pairs=True, clustering=True, first_view_clean_as_written=True),
    "supervised": Method("supervised", supervised=True),
}
NAMES = tuple(METHODS)
# The original's (clustering_use, metric_learn) flags -> method, as its main.py dispatched them.
_FLAGS = {(True, True): "spcl", (True, False): "cluster", (False, True): "metric", (False, False): "simclr"}


def pretrains(mode: str, finetune: bool, eval_disent: bool) -> bool:
    """Whether a run pretrains (else it evaluates a saved encoder: mode=linear_eval|knn_eval, or the
    original's `finetune` / `eval_disent` switches)."""
    return mode == "pretrain" and not finetune and not eval_disent


def resolve(name: str, clustering_use: bool | None = None, metric_learn: bool | None = None,
            supervised: bool | None = None) -> Method:
    """The `Method`: the original's flags choose it when any of them is set, else `name`.
    A method name that is not one of NAMES raises KeyError (the config validator names it first)."""
    if all(flag is None for flag in (clustering_use, metric_learn, supervised)):
        return METHODS[name]
    if supervised:
        return METHODS["supervised"]
    return METHODS[_FLAGS[(bool(clustering_use), bool(metric_learn))]]
