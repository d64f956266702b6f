"""The one line a refusal quotes from the error behind it."""

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtrl_hpc.errors import MAX_CHARS, short_error


def test_short_error_keeps_the_first_line_only():
    assert short_error(OSError("Unable to open file\n  at line 3 of H5F.c\n  errno 2")) == "Unable to open file"


def test_short_error_names_the_type_of_an_error_without_a_message():
    assert short_error(KeyError()) == "KeyError"
    assert short_error(ValueError("\n  \n")) == "ValueError"  # blank text would otherwise leave "" or IndexError


def test_short_error_cuts_a_long_line():
    assert short_error(RuntimeError("x" * 1000)) == "x" * MAX_CHARS


def test_short_error_of_an_unresolvable_interpolation_names_it():
    cfg = OmegaConf.create({"a": "${missing}"})
    try:
        cfg.a
    except OmegaConfBaseException as e:
        line = short_error(e)
    assert "\n" not in line and "missing" in line
