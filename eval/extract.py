"""Rule-based answer extraction, as VLMEvalKit (commit 6c85ef78, the AKI paper's) does it."""

import re

# VLMEvalKit's refusal phrases: an answer containing one is option 'Z' (wrong).
REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
API_FAILURE = "Failed to obtain answer via API"

# The VQA-evaluation punctuation handling that VLMEvalKit's yes/no extraction uses.
_PUNCTUATION = [
    ";",
    r"/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    out = text
    for mark in _PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)


def yes_no(answer: str) -> str:
    """'Yes', 'No' or 'Unknown': a lone yes or a lone no among the answer's words."""
    words = process_punctuation(str(answer).lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def can_infer_option(answer: str, choices: dict[str, str]) -> str | bool:
    """The option letter the answer names, if exactly one letter stands alone in it."""
    if API_FAILURE in answer:
        return False
    if any(refusal in answer for refusal in REFUSALS):
        return "Z"
    for char in ".()[],:;!*#{}":
        answer = answer.replace(char, " ")
    tokens = [token.strip() for token in answer.split()]
    named = [letter for letter in choices if letter in tokens]
    if len(named) == 1:  # any position counts (later VLMEvalKit versions require one of the last tokens)
        return named[0]
    if not named and "Z" in tokens:
        return "Z"
    return False


def can_infer_text(answer: str, choices: dict[str, str]) -> str | bool:
    """The option whose text, alone among the options, appears in the answer."""
    answer = answer.lower()
    found = [letter for letter, text in choices.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else False


def can_infer(answer, choices: dict[str, str]) -> str | bool:
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def strict_letter(prediction: str, answer: str) -> bool:
    """CV-Bench as the AKI script scores it: the output must be exactly the letter."""
    return prediction == answer.replace("(", "").replace(")", "")
