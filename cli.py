"""The command-line helpers every script uses; torch-free, so a mistyped command fails at once.

- `UserError`: a mistake the user can fix; `main_guard` prints its one line and exits with status 2.
- `ArgumentParser`: argparse whose usage errors are one line and whose --help shows every default.
- Argument types that check ranges: `str2bool`, `positive_int`, `nonnegative_int`, `positive_float`,
  `nonnegative_float`, `unit_interval` ([0, 1]), `decay` ([0, 1)), `finite_float`, `worker_count`
  (-1 or more), `seed_value` ([0, 2^63)), `int_list`, `index_list`, `label_list`, `weight_list`.
- `add_common_arguments`: --module, --device and --seed, which every script but prepare_data.py takes.
"""
import argparse
import functools
import math
import sys


class UserError(Exception):
    """A mistake the user can fix; scripts print its one-line message and exit with status 2."""


def main_guard(main):
    """Run `main`, turning user mistakes into one line on stderr and exit status 2 (never a traceback)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help lists each flag's default and keeps the description's line breaks."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the message), exit status 2; --help shows defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def str2bool(value):
    """Parse True/False properly (argparse's bool conversion would turn 'False' into True)."""
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def _number(kind, value):
    try:
        number = kind(str(value).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
    if kind is float and not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {value!r}")
    return number


def positive_int(value):
    number = _number(int, value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def nonnegative_int(value):
    number = _number(int, value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return number


def positive_float(value):
    number = _number(float, value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return number


def nonnegative_float(value):
    number = _number(float, value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or greater, got {value}")
    return number


def unit_interval(value):
    number = _number(float, value)
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {value}")
    return number


def decay(value):
    number = _number(float, value)
    if not 0 <= number < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1) (0: off), got {value}")
    return number


def finite_float(value):
    return _number(float, value)


def worker_count(value):
    """-1 (chosen automatically) or a number of worker processes (0: load in the main process)."""
    number = _number(int, value)
    if number < -1:
        raise argparse.ArgumentTypeError(f"must be -1 (automatic), 0 or a positive integer, got {value}")
    return number


def seed_value(value):
    """A random seed: an integer in [0, 2^63)."""
    number = _number(int, value)
    if not 0 <= number < 2 ** 63:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 2^63 - 1, got {value}")
    return number


def index_list(value):
    """'7,3,0' -> [7, 3, 0]: distinct integers >= 0 separated by commas (step indices)."""
    parts = [part.strip() for part in str(value).split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts) or len(set(map(int, parts))) != len(parts):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0 separated by commas, got {value!r}")
    return [int(part) for part in parts]


def label_list(value):
    """'0,1,1,9' -> [0, 1, 1, 9]: class labels, integers >= 0 separated by commas (repeats allowed)."""
    parts = [part.strip() for part in str(value).split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected class labels (integers >= 0) separated by commas, got {value!r}")
    return [int(part) for part in parts]


def int_list(value):
    """'8,4,2' -> [8, 4, 2]: positive integers separated by commas."""
    parts = [part.strip() for part in str(value).split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {value!r}")
    return [int(part) for part in parts]


def weight_list(value):
    """'0,0.5,4' -> [0.0, 0.5, 4.0]: numbers >= 0 (guidance weights) separated by commas, each once."""
    parts = [part.strip() for part in str(value).split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected numbers >= 0 separated by commas, got {value!r}")
    return list(dict.fromkeys(nonnegative_float(part) for part in parts))


def add_common_arguments(parser):
    """Flags every script shares."""
    parser.add_argument("--module", required=True, help="user module with make_model() and make_dataset(), e.g. celeba_u")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--seed", type=seed_value, default=0, help="random seed")
