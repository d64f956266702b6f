"""The config tree is the schema: every key a run may set, and its type, is the one its defaults give it.

A run's config is compared with the reference config: the tree composed with the same group choices
(`env=...`, `agent=...`) and none of the key overrides. A key the reference lacks is one nothing reads
(`+setup.num_thread=1`), and a value whose type differs from the default's cannot work
(`replay_buffer.batch_size=abc`). Both are found before anything else runs, so that the value checks
(config_checks.py) only ever see values of the right type.
"""

import difflib

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mtrl_hpc.config_dir import config_dir
from mtrl_hpc.errors import short_error

# Keys whose default has one type but that accept others too (the value checks say which values work).
EXTRA_TYPES = {
    "logger.progress_bar": (bool,),  # auto | true | false
    "experiment.critic_loss_ceiling": (type(None),),  # null: no ceiling
}
# Mappings whose keys are names the user chooses (cluster name -> keywords): any key may be added under them.
FREE_FORM = ("agent.encoder.moe.task_id_to_encoder_id_cfg.cluster.clusters",)
# Optimizer clip norms are null by default and numbers when set; a null default accepts any type anyway.
# Metric lists are filters of what the defaults log: a run may drop names, never add ones nothing produces.
METRIC_LISTS = ("metrics.train", "metrics.eval")


def reference_config(group_overrides: list[str]) -> DictConfig:
    """The tree with only these group choices applied (e.g. ["env=metaworld-mt1", "agent=state_sac"])."""
    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=group_overrides)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="config", overrides=group_overrides)


def group_overrides(overrides: list[str], groups) -> list[str]:
    """The overrides among `overrides` that choose a config group (`env=...`, `+experiment=...`, `hydra/launcher=...`)."""
    groups = set(groups)
    chosen = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in groups:
            chosen.append(override)
    return chosen


def check_schema(cfg: DictConfig, reference: DictConfig) -> list[str]:
    """Every unknown key and wrongly typed value in cfg (the `hydra` node aside), as one message each."""
    defaults = _flatten(_plain(reference))
    try:
        values = _flatten(_plain(cfg))
    except OmegaConfBaseException as error:
        # An override that breaks an interpolation (agent.actor=3 where agent.critic reads agent.actor.*):
        # check what can be checked without resolving, and name the broken reference if nothing else is wrong.
        values = {k: v for k, v in _flatten(_plain(cfg, resolve=False)).items()
                  if not (isinstance(v, str) and "${" in v)}
        problems = _check_values(values, defaults)
        where = f"{error.full_key}: " if getattr(error, "full_key", None) else ""
        return problems or [f"{where}the config cannot be resolved: {short_error(error)}"]
    problems = _check_values(values, defaults)
    for key in METRIC_LISTS:
        given, known = _select(cfg, key), _select(reference, key)
        if isinstance(given, (list, ListConfig)) and isinstance(known, (list, ListConfig)):
            unknown = [n for n in given if n not in list(known)]
            if unknown:
                problems.append(f"{key} has names nothing logs: {unknown}; choose from {', '.join(map(str, known))}")
    return problems


def _check_values(values: dict, defaults: dict) -> list[str]:
    problems = []
    for key, value in values.items():
        if key not in defaults:
            if any(key.startswith(f"{d}.") for d, v in defaults.items() if v is None) or key.startswith(
                    tuple(f"{f}." for f in FREE_FORM)):
                continue  # under a key whose default is null, or in a free-form mapping: anything goes
            if isinstance(value, dict) and value:
                continue  # an unknown mapping: its leaves are named, each with its closest valid key
            close = _closest_key(key, defaults)
            hint = f"did you mean {close}?" if close else "no config file defines it"
            problems.append(f"{key}: unknown key (nothing reads it); {hint}")
            continue
        default = defaults[key]
        if default is None:
            continue
        allowed = _types_of(default) + EXTRA_TYPES.get(key, ())
        if not _is_instance(value, allowed):
            problems.append(f"{key}={_show(value)} has type {_type_name(value)}; expected {_names(allowed)}")
    return problems


def _closest_key(key: str, defaults: dict) -> str | None:
    """A misspelt sibling first (setup.num_thread -> setup.num_threads), else a close key anywhere."""
    parent, _, name = key.rpartition(".")
    leaves = [d for d, v in defaults.items() if not isinstance(v, dict)]
    siblings = {d.rpartition(".")[2]: d for d in leaves if d.rpartition(".")[0] == parent}
    close = difflib.get_close_matches(name, list(siblings), n=1, cutoff=0.6)
    if close:
        return siblings[close[0]]
    close = difflib.get_close_matches(key, leaves, n=1, cutoff=0.85)
    return close[0] if close else None


def _plain(cfg: DictConfig, resolve: bool = True) -> dict:
    """The config without its `hydra` node, as plain containers."""
    node = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_container(node, resolve=resolve)


def _flatten(tree, prefix: str = "") -> dict:
    """{"a.b.c": leaf}; dicts are walked, lists and scalars are leaves (an empty dict is a leaf too)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out[name] = value  # the node itself, so that replacing it by a scalar is caught
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _select(cfg, key):
    return OmegaConf.select(cfg, key, default=None)


def _types_of(default) -> tuple:
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, int):
        return (int,)
    if isinstance(default, float):
        return (float, int)
    if isinstance(default, str):
        return (str,)
    if isinstance(default, list):
        return (list,)
    if isinstance(default, dict):
        return (dict,)
    return (type(default),)


def _is_instance(value, allowed: tuple) -> bool:
    # bool is an int in Python, but `batch_size=true` is a mistake, not a count.
    if isinstance(value, bool):
        return bool in allowed
    return isinstance(value, allowed)


_TYPE_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a mapping", type(None): "null"}


def _type_name(value) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _names(types: tuple) -> str:
    names = [_TYPE_NAMES.get(t, t.__name__) for t in types]
    if float in types and int in types:
        names.remove(_TYPE_NAMES[int])
    return " or ".join(dict.fromkeys(names))


def _show(value) -> str:
    if isinstance(value, dict):
        return "{...}"
    return repr(value) if isinstance(value, str) else str(value)
