"""Write the packaged task `packaged:worked_sums` (src/esrdistill/tasks/worked_sums/{train,test}.jsonl).

Word problems adding two numbers from 1 to 9 ("Tom has 3 apples and gets 5 more. ..."), each with a worked answer
of five lines (about 60 SmolLM2 tokens with its tag): long enough that ESR's K cuts it, easy enough for a 135M
teacher with worked examples. The test split's names and objects never occur in the train split, so no
evaluation problem is a training prompt or a worked example, whatever the data seed: 100 test problems drawn
from 6 names x 4 objects x 81 sums, and 2,000 train problems drawn from 12 x 8 x 81 = 7,776.

    python scripts/make_worked_sums.py   # rewrites the two files; the same bytes every time
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "esrdistill" / "tasks" / "worked_sums"
TRAIN = (["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Jack", "Emma", "Leo", "Zoe", "Max", "Lily"],
         ["apples", "pencils", "books", "coins", "cards", "stickers", "marbles", "cookies"])
TEST = (["Noah", "Ella", "Liam", "Ruby", "Owen", "Ivy"], ["shells", "stamps", "candles", "buttons"])


def row(name: str, item: str, a: int, b: int) -> dict:
    lines = [f"The question asks how many {item} {name} has now.", f"{name} starts with {a} {item}.",
             f"{name} gets {b} more {item}.", f"Adding them: {a} + {b} = {a + b}.", f"So {name} has {a + b} {item} now."]
    return {"question": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            "answer": str(a + b), "solution": "\n".join(lines)}


def rows(names: list[str], items: list[str]) -> list[dict]:
    return [row(n, i, a, b) for n in names for i in items for a in range(1, 10) for b in range(1, 10)]


def main() -> None:
    rng = random.Random(0)
    train, test = rows(*TRAIN), rows(*TEST)
    rng.shuffle(train)
    rng.shuffle(test)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("test", test[:100]), ("train", train[:2000])):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"{OUT / name}.jsonl: {len(part)} rows")


if __name__ == "__main__":
    main()
