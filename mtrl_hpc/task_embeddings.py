"""Pretrained task embeddings: one vector per task, computed from a text description of the task.

Two file formats are read (both JSON, task name -> vector):
- mtrl's (metadata/task_embedding/roberta_small/metaworld-mt{10,50}.json): a flat object of MetaWorld v1 names
  ("reach-v1") -> 768 floats. Names of any MetaWorld version are matched to the run's v3 tasks by their stem.
- the project's: {"format": FORMAT, "model": ..., "pooling": ..., "descriptions": {...}, "embeddings": {...}},
  written by the command below, which records what the table was computed from.

Make a table from a local sentence/transformer model (nothing is downloaded):

    python -m mtrl_hpc.task_embeddings --model PATH/TO/LOCAL/MODEL --out metadata/task_embedding/roberta_small/metaworld-mt10.json [--benchmark MT10]

The model directory is anything `transformers.AutoModel.from_pretrained` and `AutoTokenizer.from_pretrained`
load with local_files_only=True (e.g. a saved roberta-base or a sentence-transformers model). Each task's vector
is the mean over its description's tokens of the model's last hidden layer (how mtrl's RoBERTa table was made).
Needs the optional package `transformers`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import sys

import torch

FORMAT = "mtrl_hpc.task_embeddings/1"

# One line per MetaWorld v3 task: what the robot must achieve.
DESCRIPTIONS = {
    "assembly-v3": "Pick up a nut and place it onto a peg.",
    "basketball-v3": "Pick up a ball and dunk it into the basket.",
    "bin-picking-v3": "Pick up a puck from one bin and place it into the other bin.",
    "box-close-v3": "Pick up the lid and place it on top of the box to close it.",
    "button-press-topdown-v3": "Press a button from the top.",
    "button-press-topdown-wall-v3": "Press a button from the top while avoiding a short wall.",
    "button-press-v3": "Press a button from the side.",
    "button-press-wall-v3": "Press a button from the side while avoiding a short wall.",
    "coffee-button-v3": "Push the button on the coffee machine.",
    "coffee-pull-v3": "Pull a mug away from the coffee machine.",
    "coffee-push-v3": "Push a mug under the coffee machine.",
    "dial-turn-v3": "Rotate a dial by 180 degrees.",
    "disassemble-v3": "Pick a nut off a peg.",
    "door-close-v3": "Close a door with a revolving joint.",
    "door-lock-v3": "Lock the door by rotating the lock clockwise.",
    "door-open-v3": "Open a door with a revolving joint.",
    "door-unlock-v3": "Unlock the door by rotating the lock counter-clockwise.",
    "hand-insert-v3": "Insert the gripper into a hole.",
    "drawer-close-v3": "Push and close a drawer.",
    "drawer-open-v3": "Open a drawer.",
    "faucet-open-v3": "Rotate the faucet handle counter-clockwise to open the faucet.",
    "faucet-close-v3": "Rotate the faucet handle clockwise to close the faucet.",
    "hammer-v3": "Pick up a hammer and hammer a screw into the wall.",
    "handle-press-side-v3": "Press a handle down sideways.",
    "handle-press-v3": "Press a handle down.",
    "handle-pull-side-v3": "Pull a handle up sideways.",
    "handle-pull-v3": "Pull a handle up.",
    "lever-pull-v3": "Pull a lever up by 90 degrees.",
    "pick-place-wall-v3": "Pick a puck, bypass a wall and place the puck at the goal.",
    "pick-out-of-hole-v3": "Pick up a puck from a hole.",
    "pick-place-v3": "Pick up a puck and place it at the goal.",
    "plate-slide-v3": "Slide a plate into a cabinet.",
    "plate-slide-side-v3": "Slide a plate into a cabinet sideways.",
    "plate-slide-back-v3": "Get a plate from the cabinet by sliding it back.",
    "plate-slide-back-side-v3": "Get a plate from the cabinet by sliding it back sideways.",
    "peg-insert-side-v3": "Insert a peg sideways into a hole.",
    "peg-unplug-side-v3": "Unplug a peg sideways from a hole.",
    "soccer-v3": "Kick a soccer ball into the goal.",
    "stick-push-v3": "Grasp a stick and push a box with the stick.",
    "stick-pull-v3": "Grasp a stick and pull a box with the stick.",
    "push-v3": "Push a puck to the goal.",
    "push-wall-v3": "Push a puck to the goal while bypassing a wall.",
    "push-back-v3": "Pull a puck back to the goal.",
    "reach-v3": "Reach a goal position with the gripper.",
    "reach-wall-v3": "Reach a goal position with the gripper while bypassing a wall.",
    "shelf-place-v3": "Pick up a puck and place it onto a shelf.",
    "sweep-into-v3": "Sweep a puck into a hole.",
    "sweep-v3": "Sweep a puck off the table.",
    "window-open-v3": "Push and open a sliding window.",
    "window-close-v3": "Push and close a sliding window.",
}

MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")

_VERSION = re.compile(r"-v\d+$")


def task_stem(name: str) -> str:
    """"reach-v1", "reach-v2", "reach-v3" -> "reach": how tables of other MetaWorld versions find v3 tasks."""
    return _VERSION.sub("", name)


def cluster_mask(clusters: dict[str, list[str]], task_names: list[str]) -> torch.Tensor:
    """[tasks, clusters] 0/1: 1 where one of the cluster's keywords is a whole word (or phrase) of the task's
    description, case-insensitive (mtrl matched substrings case-sensitively and left 18 of 50 tasks unmatched)."""
    unknown = [n for n in task_names if n not in DESCRIPTIONS]
    if unknown:
        raise ValueError(f"no description for {', '.join(unknown)}: expert clusters are matched against the task descriptions")
    rows = []
    for name in task_names:
        text = DESCRIPTIONS[name].lower()
        rows.append([float(any(re.search(rf"\b{re.escape(k.lower())}\b", text) for k in words)) for words in clusters.values()])
    return torch.tensor(rows)


def how_to_make(path) -> str:
    return (f"make one with `python -m mtrl_hpc.task_embeddings --model <local transformer model dir> --out {path}` "
            "or copy mtrl's metadata/task_embedding/roberta_small/<env>.json there")


def load_table(path, task_names: list[str]) -> torch.Tensor:
    """The embedding of each task in task_names, in that order: float32 [tasks, dim]."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no task embedding file at {path}: {how_to_make(path)}")
    data = json.loads(path.read_text())
    if data.get("format") == FORMAT:
        vectors = data["embeddings"]
    elif "format" in data:
        raise ValueError(f"{path}: unknown task embedding format {data['format']!r} (this version reads {FORMAT!r})")
    else:
        vectors = data  # mtrl's: task name -> vector
    by_stem = {task_stem(name): vector for name, vector in vectors.items()}
    missing = [name for name in task_names if task_stem(name) not in by_stem]
    if missing:
        raise ValueError(f"{path} has no embedding for {', '.join(missing)}; {how_to_make(path)}")
    table = torch.tensor([by_stem[task_stem(name)] for name in task_names], dtype=torch.float32)
    if table.dim() != 2:
        raise ValueError(f"{path}: every task needs a vector of the same length")
    return table


class TextEncoder:
    """A local transformers model as a sentence encoder: mean of the last hidden layer over a text's tokens."""

    def __init__(self, model_dir: str):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise SystemExit("computing task embeddings needs the optional package transformers: pip install transformers") from None
        if not os.path.isdir(model_dir):
            raise SystemExit(f"--model {model_dir}: not a directory; give the folder of a locally saved model")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, padding=True, return_tensors="pt")
        hidden = self.model(**tokens).last_hidden_state  # [texts, tokens, dim]
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # padding tokens do not count
        return (hidden * mask).sum(1) / mask.sum(1)


def compute_table(encode, task_names: list[str]) -> dict[str, list[float]]:
    vectors = encode([DESCRIPTIONS[name] for name in task_names])
    return {name: vector.tolist() for name, vector in zip(task_names, vectors)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Task embeddings from the tasks' descriptions with a local model.")
    parser.add_argument("--model", required=True, help="directory of a locally saved transformers model")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--benchmark", choices=("MT10", "MT50"), default="MT50",
                        help="tasks to embed (MT50 covers MT10 and every MT1 task)")
    args = parser.parse_args(argv)
    names = list(MT10) if args.benchmark == "MT10" else list(DESCRIPTIONS)
    embeddings = compute_table(TextEncoder(args.model), names)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": FORMAT, "model": os.path.abspath(args.model), "pooling": "mean of the last hidden layer over tokens",
           "descriptions": {n: DESCRIPTIONS[n] for n in names}, "embeddings": embeddings}
    out.write_text(json.dumps(doc))
    print(f"wrote {len(names)} task embeddings of size {len(next(iter(embeddings.values())))} to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
