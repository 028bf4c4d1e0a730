"""The answer normalization of the VQA evaluation (EvalAI's, as the original's m4c_evaluator has it) and the VQA
accuracy of one answer against ten human answers. Used for TextVQA, VQAv2 and VizWiz."""

import re

# contracted form: the forms without (some of) its apostrophes that the normalization turns into it
_CONTRACTED_FORMS = """
ain't: aint
aren't: arent
can't: cant
could've: couldve
couldn't: couldnt
couldn't've: couldn'tve couldnt've
didn't: didnt
doesn't: doesnt
don't: dont
hadn't: hadnt
hadn't've: hadnt've hadn'tve
hasn't: hasnt
haven't: havent
he'd: hed
he'd've: hed've he'dve
he's: hes
how'd: howd
how'll: howll
how's: hows
isn't: isnt
it'd: itd
it'd've: itd've it'dve
it'll: itll
ma'am: maam
mightn't: mightnt
mightn't've: mightnt've mightn'tve
might've: mightve
mustn't: mustnt
must've: mustve
needn't: neednt
not've: notve
o'clock: oclock
oughtn't: oughtnt
'ow's'at: ow's'at 'ows'at 'ow'sat
shan't: shant
she'd've: shed've she'dve
should've: shouldve
shouldn't: shouldnt
shouldn't've: shouldnt've shouldn'tve
somebodyd: somebody'd
somebody'd've: somebodyd've somebody'dve
somebody'll: somebodyll
somebody's: somebodys
someone'd: someoned
someone'd've: someoned've someone'dve
someone'll: someonell
someone's: someones
something'd: somethingd
something'd've: somethingd've something'dve
something'll: somethingll
that's: thats
there'd: thered
there'd've: thered've there'dve
there're: therere
there's: theres
they'd: theyd
they'd've: theyd've they'dve
they'll: theyll
they're: theyre
they've: theyve
'twas: twas
wasn't: wasnt
we'd've: wed've we'dve
we've: weve
weren't: werent
what'll: whatll
what're: whatre
what's: whats
what've: whatve
when's: whens
where'd: whered
where's: wheres
where've: whereve
who'd: whod
who'd've: whod've who'dve
who'll: wholl
who's: whos
who've: whove
why'll: whyll
why're: whyre
why's: whys
won't: wont
would've: wouldve
wouldn't: wouldnt
wouldn't've: wouldnt've wouldn'tve
y'all: yall
y'all'll: yall'll y'allll
y'all'd've: yall'd've y'alld've y'all'dve
you'd: youd
you'd've: youd've you'dve
you'll: youll
you're: youre
you've: youve
"""
CONTRACTIONS = {
    written: contracted
    for line in _CONTRACTED_FORMS.strip().splitlines()
    for contracted, forms in [line.split(": ")]
    for written in forms.split()
}  # the original's table also maps "somebody'd" to "somebodyd" (kept) and a few capitalized words (never reached)
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
PERIODS_REMOVED = 32  # the original passes re.UNICODE (32) where re.sub takes its count


def _strip_punctuation(text: str) -> str:
    """A mark that touches a space anywhere in `text` is removed everywhere, any other becomes a space."""
    stripped = text
    for mark in PUNCTUATION:
        stripped = stripped.replace(mark, "" if (mark + " " in text or " " + mark in text) else " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", stripped, count=PERIODS_REMOVED)


def normalize_answer(answer: str) -> str:
    """Lower case, "?" and "," removed, "'s" split off, punctuation, number words to digits, articles dropped,
    contractions restored."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBERS.get(word, word) for word in text.split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """min(1, humans who gave the answer / 3), averaged over the subsets that leave one human out (in [0, 1])."""
    predicted = normalize_answer(prediction)
    answers = [normalize_answer(answer) for answer in human_answers]
    scores = []
    for left_out in range(len(answers)):
        agreeing = sum(answer == predicted for index, answer in enumerate(answers) if index != left_out)
        scores.append(min(1, float(agreeing) / 3))
    return sum(scores) / len(scores)


HUMAN_ANSWERS = 10


def human_answer_texts(answers, where: str) -> list[str]:
    """The ten answer strings of a VQA-format annotation (`answers`: [{"answer": ...}, ...] or strings)."""
    texts = [answer.get("answer") if isinstance(answer, dict) else answer for answer in answers or []]
    if len(texts) != HUMAN_ANSWERS or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"{where} has {len(texts) or 'no'} answer strings, expected {HUMAN_ANSWERS}: the test split "
                         "has no answers; score with the validation annotations")  # fmt: skip
    return texts


def human_answers_by(entries: list, key: str, where: str) -> dict:
    """The ten human answers of each VQA-format annotation entry (VQAv2's, VizWiz's), by its `key` field."""
    human_answers = {}
    for number, entry in enumerate(entries):
        if not (isinstance(entry, dict) and key in entry):
            raise ValueError(f"{where}[{number}] has no {key!r}")
        entry_where = f"{where}[{number}] ({key} {entry[key]!r})"
        human_answers[entry[key]] = human_answer_texts(entry.get("answers"), entry_where)
    return human_answers
