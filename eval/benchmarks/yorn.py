"""Yes/no answers (MME, POPE): rule extraction, and the judge only for what the rules cannot read."""

from ..data import Record
from ..extract import yes_no

# VLMEvalKit's yes/no matcher, for answers that are neither a lone yes nor a lone no.
MATCH_PROMPT = (
    "You are an AI assistant who will help me to match an answer with two options of a question. "
    "The options are only Yes / No. "
    "You are provided with a question and an answer, and you need to find which option (Yes / No) is most similar to the answer. "
    "If the meaning of all options are significantly different from the answer, output Unknown. "
    "Your should output a single word among the following 3 choices: Yes, No, Unknown.\n"
    "Example 1: \n"
    "Question: Is the word in this image 'Hello'?\nAnswer: The word in this image is 'Hello'.\nYour output: Yes\n"
    "Example 2: \n"
    "Question: Is the word in this image 'Hello'?\nAnswer: The word in this image is not 'Hello'.\nYour output: No\n"
    "Example 3: \n"
    "Question: {question}?\nAnswer: {prediction}\nYour output: "
)


def read_yes_no(question: str, prediction: str, judge) -> tuple[str, str]:
    """(Yes | No | Unknown, how it was read)."""
    answer = yes_no(prediction)
    if answer != "Unknown" or judge is None:
        return answer, "rule"
    for attempt in range(5):
        reply = judge.ask(
            MATCH_PROMPT.format(question=question, prediction=prediction), temperature=0.5 * attempt, max_tokens=16
        )
        answer = yes_no(reply)
        if answer != "Unknown":
            return answer, "judge"
    return "Unknown", "judge"


def yes_no_record(row: dict, images: list, index: str, **extra) -> Record:
    """A yes/no question (answers normalised to 'Yes' / 'No', as the toolkit compares them)."""
    return Record(
        index=index,
        question=row["question"],
        answer=str(row["answer"]).strip().capitalize(),
        images=images,
        category=row["category"],
        extra=extra,
    )
