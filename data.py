"""SuperNI data: the prompt of SPEC section 7 and reading tasks in the natural-instructions format."""

import json
from pathlib import Path

# SPEC section 7, exactly; note the trailing space after "Output:".
PROMPT = "{definition}\n\nNow complete the following example -\nInput: {input}\nOutput: "


def format_prompt(definition: str, input: str) -> str:
    return PROMPT.format(definition=definition, input=input)


def read_task(root, task: str, split: str) -> tuple[str, list[dict]]:
    """(definition, instances) of <root>/<task>/<split>.json; each instance has id, input, output (a list)."""
    file = Path(root) / task / f"{split}.json"
    data = json.loads(file.read_text())
    return " ".join(data["Definition"]), data["Instances"]
