"""The errors that mean "the user's input is wrong": the CLI prints them as one line."""

from rewards.registry import UnknownRewardError
from rl.config import ConfigError
from rl.data import DataError
from rl.models import ModelNotFoundError
from rl.scoring import RewardError

USER_ERRORS = (ConfigError, DataError, ModelNotFoundError, UnknownRewardError, RewardError)
