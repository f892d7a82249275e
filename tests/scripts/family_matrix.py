"""Run under `deepspeed --num_accelerators 2`: for each tiny family folder, the trainer's own
``rdcore.train.run`` (what ``train.py`` does after parsing its flags) in LoRA and full modes, once
with every teacher cache and the interleaving on and once with all of them off. One launch serves
every run (each builds its own model and DeepSpeed engine), so the matrix costs one process
start-up, not forty.

    deepspeed --num_accelerators 2 tests/scripts/family_matrix.py OUT_DIR FAMILY_DIR...
"""

import sys
from pathlib import Path

from rdcore import engine as eng
from rdcore import train
from rdcore.config import config_from_args

FLAGS = ["--task", "math", "--shots", "4", "--epochs", "2", "--lr", "1e-4", "--seed", "3",
         "--beta", "10", "--tensorboard", "off", "--lora_dropout", "0"]
MODES = {"lora": ["--method", "rule_distill_base", "--finetune", "lora", "--save_model", "merged"],
         "full": ["--method", "rule_distill_base", "--finetune", "full", "--save_model", "off"]}
CACHES = {"on": ["--prefix_cache", "on", "--teacher_cache", "on", "--interleave", "on"],
          "off": ["--prefix_cache", "off", "--teacher_cache", "off", "--interleave", "off"]}


def main(out_root: Path, folders: list[Path]) -> None:
    rank, world = eng.init_distributed()
    for folder in folders:
        for mode, mode_flags in MODES.items():
            for caches, cache_flags in CACHES.items():
                out = out_root / f"{folder.name}_{mode}_{caches}"
                cfg = config_from_args(["--model", str(folder), *FLAGS, *mode_flags, *cache_flags,
                                        "--output_dir", str(out)])
                train.run(cfg, train.prepare_output_dir(cfg, rank), rank, world)
                if rank == 0:
                    print(f"matrix run done: {out.name}", flush=True)
    eng.shutdown()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(Path(args[0]), [Path(a) for a in args[1:]])
