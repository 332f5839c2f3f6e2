"""The errors that mean "the user's input is wrong" or "the run folder cannot be used" (in use,
unwritable, a full disk, a damaged log or checkpoint): the CLI prints them as one line."""

from rewards.registry import UnknownRewardError
from rl.checkpoint import RunFolderError
from rl.config import ConfigError
from rl.data import DataError
from rl.distill.traces import DistillError
from rl.jsonl import JsonlError
from rl.models import ModelNotFoundError
from rl.scoring import RewardError
from rl.trainer import NonFiniteUpdateError

USER_ERRORS = (
    ConfigError,
    DataError,
    DistillError,
    ModelNotFoundError,
    UnknownRewardError,
    RewardError,
    RunFolderError,
    JsonlError,
    NonFiniteUpdateError,
)
