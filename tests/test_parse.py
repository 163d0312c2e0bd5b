"""gcr.parse: the critique grammar, every tolerated variant, every refusal, and never raising."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gcr.parse import DIMENSIONS, Critique, parse_critique

DATA = Path(__file__).parent / "data" / "critiques"

TITLES = {
    "text_faithfulness": "Text Faithfulness",
    "image_faithfulness": "Image Faithfulness",
    "physical_quality": "Physical and Visual Quality",
    "text_rendering": "Text Rendering",
}


def critique(task="t2i", scores=None, *, score_first=False, analysis=True, refined="A red fox in snow at dusk.",
             number="{i}. ", header="{title}:", score_line="## Score: {value}", just_line="## Justification: {text}"):
    """A critique as the model writes it (the format in prompts/*_user.txt), with knobs for each variant."""
    scores = scores or {"text_faithfulness": 3.25, "image_faithfulness": 3.75, "physical_quality": 3.5,
                        "text_rendering": "N/A"}
    lines = ["# User Request Analysis", "The user wants a red fox sitting in snow."] if analysis else []
    lines.append("# Detailed Judgement")
    for i, dim in enumerate(DIMENSIONS[task], 1):
        lines.append(number.format(i=i) + header.format(title=TITLES[dim]))
        block = [just_line.format(text=f"About {dim}."), score_line.format(value=scores[dim])]
        lines += block[::-1] if score_first else block
    lines += ["# Summary: Good overall.", "", "# User Request Refinement:",
              "## Refinement Comments: Say more about the light."]
    if refined is not None:
        lines.append(f"## Refined Request: {refined}")
    return "\n".join(lines)


T2I_EXPECTED = {"text_faithfulness": 3.25, "physical_quality": 3.5, "text_rendering": None}


def assert_clean_t2i(c: Critique):
    assert c.problems == ()
    assert c.scores == T2I_EXPECTED
    assert c.overall == pytest.approx(3.375)


# ---- the canonical format -------------------------------------------------------------------

def test_canonical_t2i():
    c = parse_critique(critique("t2i"), "t2i")
    assert_clean_t2i(c)
    assert list(c.scores) == list(DIMENSIONS["t2i"])
    assert c.readable
    assert c.refined_request == "A red fox in snow at dusk."
    assert c.refinement_comments == "Say more about the light."
    assert c.summary == "Good overall."
    assert c.analysis == "The user wants a red fox sitting in snow."
    assert c.justifications == {d: f"About {d}." for d in DIMENSIONS["t2i"]}


def test_canonical_edit():
    c = parse_critique(critique("edit"), "edit")
    assert c.problems == ()
    assert c.scores == {"text_faithfulness": 3.25, "image_faithfulness": 3.75, "physical_quality": 3.5,
                        "text_rendering": None}
    assert list(c.scores) == list(DIMENSIONS["edit"])
    assert c.overall == pytest.approx(3.5)
    assert c.justifications["image_faithfulness"] == "About image_faithfulness."


def test_dimensions_constant():
    assert DIMENSIONS == {
        "t2i": ("text_faithfulness", "physical_quality", "text_rendering"),
        "edit": ("text_faithfulness", "image_faithfulness", "physical_quality", "text_rendering"),
    }


def test_critique_is_frozen():
    c = parse_critique(critique())
    with pytest.raises(AttributeError):
        c.overall = 1.0


def test_invalid_task_is_a_programmer_error():
    with pytest.raises(ValueError, match="expected one of"):
        parse_critique(critique(), "video")


# ---- variants the reference README lists --------------------------------------------------

def test_score_before_justification():
    c = parse_critique(critique(score_first=True))
    assert_clean_t2i(c)
    assert c.justifications["physical_quality"] == "About physical_quality."


def test_no_analysis_header_keeps_the_leading_text_as_analysis():
    text = "The user wants a fox.\n" + critique(analysis=False)
    c = parse_critique(text)
    assert_clean_t2i(c)
    assert c.analysis == "The user wants a fox."


def test_prose_before_the_analysis_header_is_not_the_analysis():
    c = parse_critique("Sure! Here is my evaluation.\n\n" + critique())
    assert_clean_t2i(c)
    assert c.analysis == "The user wants a red fox sitting in snow."


@pytest.mark.parametrize("score_line", ["**Score:** {value}", "## **Score**: {value}", "## Score: **{value}**",
                                        "**Score**: {value}", "## __Score:__ {value}", "##Score:{value}",
                                        "## Score {value}", "**## Score: {value}**"])
def test_bold_markers_around_the_score(score_line):
    assert_clean_t2i(parse_critique(critique(score_line=score_line)))


@pytest.mark.parametrize("header", ["**{title}**:", "**{title}:**", "## {title}", "### **{title}**", "{title}"])
def test_bold_and_hash_dimension_headers(header):
    assert_clean_t2i(parse_critique(critique(header=header)))


@pytest.mark.parametrize("number", ["{i}. ", "{i}) ", "({i}) ", "", "**{i}. ", "#### {i}. "])
def test_numbering_variants(number):
    assert_clean_t2i(parse_critique(critique(number=number)))


@pytest.mark.parametrize("raw, value", [
    ("3.5/4", 3.5), ("3.5 / 4", 3.5), ("2.75/4.0", 2.75), ("3.5 (minor flaws)", 3.5), ("3.5 out of 4", 3.5),
    ("**3**", 3.0), ("[3.5]", 3.5), ("4", 4.0), ("1", 1.0), ("1.0", 1.0), ("3,5", 3.5), ("3.5.", 3.5),
    ("3.25 - minor texture issues", 3.25),
])
def test_score_forms(raw, value):
    c = parse_critique(critique(scores={**T2I_EXPECTED, "physical_quality": raw}))
    assert c.problems == ()
    assert c.scores["physical_quality"] == value


@pytest.mark.parametrize("raw", ["N/A", "N/A (no text requested)", "n/a", "NA", "N.A.", "Not applicable",
                                 "not applicable - the prompt has no text", "None", "**N/A**", "[N/A]"])
def test_not_applicable_forms(raw):
    c = parse_critique(critique(scores={**T2I_EXPECTED, "text_rendering": raw}))
    assert c.problems == ()
    assert "text_rendering" in c.scores and c.scores["text_rendering"] is None


@pytest.mark.parametrize("label", ["Physical and Visual Quality", "Physical Quality", "Visual Quality",
                                   "Physical & Visual Quality", "physical and visual quality"])
def test_physical_quality_labels(label):
    text = critique().replace("Physical and Visual Quality", label)
    assert_clean_t2i(parse_critique(text))


def test_multi_line_sections_are_kept_whole():
    text = critique(refined="A red fox in snow,\nwarm dusk light.\n\nA second paragraph about the sky.")
    text = text.replace("## Justification: About text_faithfulness.",
                        "## Justification: First line.\nSecond line.\n- a bullet")
    text = text.replace("# Summary: Good overall.", "# Summary: Good overall.\nBut the sky is flat.")
    c = parse_critique(text)
    assert_clean_t2i(c)
    assert c.refined_request == "A red fox in snow,\nwarm dusk light.\n\nA second paragraph about the sky."
    assert c.justifications["text_faithfulness"] == "First line.\nSecond line.\n- a bullet"
    assert c.summary == "Good overall.\nBut the sky is flat."


def test_value_on_the_line_after_its_label():
    text = critique(score_line="## Score:\n{value}").replace("## Refined Request: ", "## Refined Request:\n\n")
    c = parse_critique(text)
    assert_clean_t2i(c)
    assert c.refined_request == "A red fox in snow at dusk."


def test_text_under_a_dimension_without_a_justification_label():
    c = parse_critique(critique(just_line="{text}"))
    assert_clean_t2i(c)
    assert c.justifications["text_faithfulness"] == "About text_faithfulness."


def test_inline_score_on_the_dimension_line():
    text = critique().replace("3. Text Rendering:\n## Justification: About text_rendering.\n## Score: N/A",
                              "3. Text Rendering: N/A\n## Justification: No text requested.")
    assert_clean_t2i(parse_critique(text))


def test_prose_that_starts_with_a_dimension_name_is_not_a_header():
    text = critique().replace("The user wants a red fox sitting in snow.",
                              "Text rendering: the sign must read OPEN.\nScore: is not given here.")
    c = parse_critique(text)
    assert c.scores == T2I_EXPECTED
    assert c.analysis.startswith("Text rendering: the sign must read OPEN.")


def test_crlf_line_endings():
    assert_clean_t2i(parse_critique(critique().replace("\n", "\r\n")))
    c = parse_critique(critique(refined="line one\nline two").replace("\n", "\r\n"))
    assert c.refined_request == "line one\nline two"


def test_code_fence_around_everything():
    assert_clean_t2i(parse_critique("```markdown\n" + critique() + "\n```"))
    assert parse_critique("```\n" + critique() + "\n```\n").refined_request == "A red fox in snow at dusk."


def test_leading_and_trailing_whitespace():
    c = parse_critique("\n\n   " + critique(refined="  A fox.   ") + "   \n\n\t")
    assert_clean_t2i(c)
    assert c.refined_request == "A fox."


def test_think_prelude_and_chat_tokens():
    text = "<|im_start|>assistant\n<think>\nScore: 1\n</think>\n" + critique() + "<|im_end|>\n<|endoftext|>"
    c = parse_critique(text)
    assert_clean_t2i(c)
    assert c.refined_request == "A red fox in snow at dusk."


@pytest.mark.parametrize("junk", ["<|im_end|>", "\n<|im_end|>\nassistant: anything else", "\n# Notes\nextra",
                                  "\n### Final Answer: 3.4", "\n---\nHope this helps!", "\n```\nmore",
                                  "\n***\n*Scores use the 1-4 rubric.*"])
def test_trailing_junk_ends_the_refined_request(junk):
    c = parse_critique(critique(refined="A red fox,\n\nin deep snow.") + junk)
    assert c.refined_request == "A red fox,\n\nin deep snow."
    assert c.problems == ()


@pytest.mark.parametrize("label", ["Refined Request", "Refined Prompt", "refined user request", "REFINED REQUEST"])
def test_refined_request_label_variants(label):
    text = critique().replace("## Refined Request:", f"## {label}:")
    assert parse_critique(text).refined_request == "A red fox in snow at dusk."


def test_refined_request_in_a_code_fence():
    c = parse_critique(critique(refined="\n```\nA red fox,\nin snow.\n```\nThat should work better."))
    assert c.refined_request == "A red fox,\nin snow."


@pytest.mark.parametrize("wrapped", ['"{r}"', "'{r}'", "\u201c{r}\u201d", "**{r}**", '**"{r}"**', '"**{r}**"'])
def test_one_pair_of_surrounding_quotes_or_bold_is_removed(wrapped):
    r = "A red fox, in snow"
    assert parse_critique(critique(refined=wrapped.format(r=r))).refined_request == r


@pytest.mark.parametrize("refined", ['"Fox" and "snow"', "The 'fox' in snow", '"A fox', "a fox in snow."])
def test_quotes_that_do_not_wrap_the_whole_request_are_kept(refined):
    assert parse_critique(critique(refined=refined)).refined_request == refined


# ---- values never silently turned into numbers ---------------------------------------------

@pytest.mark.parametrize("raw, fragment", [
    ("5", "outside 1-4"), ("0", "outside 1-4"), ("35", "outside 1-4"), ("4.01", "outside 1-4"),
    ("0.5", "outside 1-4"), ("-1", "unreadable"), ("7/10", "not on the 1-4 scale"), ("3/5", "not on the 1-4 scale"),
    ("80%", "not on the 1-4 scale"), ("3.5 out of 5", "not on the 1-4 scale"), ("nan", "not a finite number"),
    ("inf", "not a finite number"), ("Infinity", "not a finite number"), ("1e999", "unreadable"),
    ("[ float score ]", "unreadable"), ("good", "unreadable"), ("three", "unreadable"), ("3.5.1", "unreadable"),
])
def test_invalid_scores_are_left_out_with_a_problem(raw, fragment):
    c = parse_critique(critique(scores={**T2I_EXPECTED, "physical_quality": raw}))
    assert "physical_quality" not in c.scores
    assert len(c.problems) == 1 and c.problems[0].startswith("physical_quality:") and fragment in c.problems[0]
    assert c.overall == pytest.approx(3.25)  # the remaining valid score


def test_missing_score_value_is_a_problem():
    c = parse_critique(critique(scores={**T2I_EXPECTED, "text_faithfulness": ""}))
    assert "text_faithfulness" not in c.scores
    assert c.problems == ("text_faithfulness: no score found",)


def test_duplicate_score_keeps_the_first():
    text = critique().replace("## Score: 3.5", "## Score: 3.5\n## Score: 1.0")
    c = parse_critique(text)
    assert c.scores["physical_quality"] == 3.5
    assert c.problems == ("physical_quality: scored 2 times; kept the first",)


def test_missing_dimension_is_named():
    text = critique().replace("2. Physical and Visual Quality:\n## Justification: About physical_quality.\n"
                              "## Score: 3.5\n", "")
    c = parse_critique(text)
    assert c.scores == {"text_faithfulness": 3.25, "text_rendering": None}
    assert c.problems == ("physical_quality: no score found",)


def test_edit_critique_parsed_as_t2i_ignores_image_faithfulness():
    c = parse_critique(critique("edit"), "t2i")
    assert c.scores == T2I_EXPECTED
    assert "image_faithfulness" not in c.justifications
    assert c.problems == ("image_faithfulness: not a t2i dimension; ignored",)


def test_t2i_critique_parsed_as_edit_misses_image_faithfulness():
    c = parse_critique(critique("t2i"), "edit")
    assert c.scores == T2I_EXPECTED
    assert c.problems == ("image_faithfulness: no score found",)


def test_na_outside_text_rendering_is_kept_as_none_and_reported():
    c = parse_critique(critique(scores={**T2I_EXPECTED, "text_faithfulness": "N/A"}))
    assert c.scores["text_faithfulness"] is None
    assert c.overall == 3.5
    assert len(c.problems) == 1 and "text_faithfulness: marked N/A" in c.problems[0]


def test_score_outside_any_dimension_is_reported_not_used():
    c = parse_critique("## Score: 3\n" + critique())
    assert c.scores == T2I_EXPECTED
    assert c.problems == ("a Score line outside any dimension was ignored",)


def test_missing_refined_request_is_a_problem():
    c = parse_critique(critique(refined=None))
    assert c.refined_request == ""
    assert c.problems == ("no Refined Request found",)
    assert c.readable  # the scores are still good


@pytest.mark.parametrize("refined", ["", "   ", '""', "<|im_end|>"])
def test_empty_refined_request_is_a_problem(refined):
    c = parse_critique(critique(refined=refined))
    assert c.refined_request == ""
    assert c.problems == ("the Refined Request is empty",)


def test_repeated_refined_request_keeps_the_first():
    c = parse_critique(critique(refined="First.") + "\n## Refined Request: Second.")
    assert c.refined_request == "First."
    assert c.problems == ("more than one Refined Request; kept the first",)


# ---- the overall mean --------------------------------------------------------------------------

@pytest.mark.parametrize("scores, overall", [
    ({"text_faithfulness": 2, "physical_quality": 4, "text_rendering": "N/A"}, 3.0),
    ({"text_faithfulness": 2, "physical_quality": 4, "text_rendering": 1}, 7 / 3),
    ({"text_faithfulness": 1, "physical_quality": 1, "text_rendering": 1}, 1.0),
    ({"text_faithfulness": 4, "physical_quality": 4, "text_rendering": 4}, 4.0),
    ({"text_faithfulness": 2.5, "physical_quality": "9", "text_rendering": "N/A"}, 2.5),
])
def test_overall_is_the_mean_of_applicable_scores(scores, overall):
    assert parse_critique(critique(scores=scores)).overall == pytest.approx(overall)


def test_all_not_applicable_is_unreadable():
    c = parse_critique(critique(scores=dict.fromkeys(T2I_EXPECTED, "N/A")))
    assert c.overall is None and not c.readable
    assert c.scores == dict.fromkeys(T2I_EXPECTED)


@pytest.mark.parametrize("text", ["", "   ", "I cannot evaluate this image.", "<|im_end|>"])
def test_text_without_a_critique(text):
    c = parse_critique(text, "edit")
    assert not c.readable and c.scores == {} and c.refined_request == ""
    assert c.problems == tuple(f"{d}: no score found" for d in DIMENSIONS["edit"]) + ("no Refined Request found",)


def test_non_string_input_does_not_raise():
    assert not parse_critique(None).readable
    assert_clean_t2i(parse_critique(critique().encode()))


# ---- held-out samples: realistic output written apart from the parser --------------------------

HELD_OUT = {
    "t2i_chatty_bold.txt": dict(
        scores={"text_faithfulness": 2.75, "physical_quality": 3.5, "text_rendering": 2.5}, problems=(),
        refined_request=(
            "A vintage 1950s travel poster of Kyoto: a five-story pagoda silhouetted against a warm orange sunset, "
            "pink cherry blossoms framing the left edge, flat screen-print colors in a limited palette.\n\n"
            'At the top, the headline "VISIT KYOTO" in large, bold, high-contrast serif capitals, every letter crisp '
            "and correctly spelled."),
        summary_start="A pleasant retro poster", analysis_start="The instruction asks for a vintage travel poster"),
    "edit_score_first.txt": dict(
        scores={"text_faithfulness": 3.0, "image_faithfulness": 3.75, "physical_quality": 2.5,
                "text_rendering": None}, problems=(),
        refined_request=(
            "Replace the blue car with a red bicycle leaning against the left side of the lamp post, casting a soft "
            "shadow on the pavement under the overcast light; fill the area where the car was with clean, continuous "
            "asphalt matching the rest of the street."),
        summary_start="The main edit was executed", analysis_start='Instruction: "Replace the blue car'),
    "t2i_fenced.txt": dict(
        scores={"text_faithfulness": 3.5, "physical_quality": 4.0, "text_rendering": None}, problems=(),
        refined_request=("A minimalist logo of a hummingbird drawn as one single unbroken continuous black line on a "
                         "pure white background, no text, no fill."),
        summary_start="Nearly perfect", analysis_start="A minimalist logo"),
    "edit_messy.txt": dict(
        scores={"image_faithfulness": 3.5},
        problems=("text_faithfulness: score 35 is outside 1-4", "image_faithfulness: scored 2 times; kept the first",
                  "physical_quality: score '7/10' is not on the 1-4 scale", "text_rendering: no score found"),
        refined_request=("Change the cat's fur from orange to a soft ash grey, keeping the living room, the sofa and "
                         "the lighting unchanged."),
        summary_start="The edit worked.", analysis_start="The user wants the cat's fur changed"),
    "t2i_think_crlf.txt": dict(
        scores={"text_faithfulness": 2.25, "physical_quality": 3.75, "text_rendering": 1.5}, problems=(),
        refined_request=('A chalkboard A-frame menu sign standing outside a cozy cafe.\n'
                         'The board reads, in neat white chalk capitals on two lines:\n'
                         'line 1 "SOUP OF THE DAY:", line 2 "TOMATO".'),
        summary_start="Nice scene", analysis_start='The request: "a chalkboard menu'),
}


@pytest.mark.parametrize("name", sorted(HELD_OUT))
def test_held_out_samples(name):
    want = HELD_OUT[name]
    text = (DATA / name).read_bytes().decode("utf-8")  # bytes: keep any CRLF as written
    c = parse_critique(text, "edit" if name.startswith("edit") else "t2i")
    assert c.scores == want["scores"]
    assert c.problems == want["problems"]
    assert c.refined_request == want["refined_request"]
    assert c.summary.startswith(want["summary_start"])
    assert c.analysis.startswith(want["analysis_start"])
    floats = [v for v in want["scores"].values() if v is not None]
    assert c.overall == pytest.approx(sum(floats) / len(floats))


def test_held_out_samples_all_listed():
    assert sorted(p.name for p in DATA.glob("*.txt")) == sorted(HELD_OUT)


# ---- never raises: arbitrary text and mutated critiques ---------------------------------------

def assert_consistent(c: Critique, task: str):
    """What must hold for ANY input: only valid numbers, and nothing missing goes unreported."""
    assert isinstance(c, Critique)
    expected = DIMENSIONS[task]
    assert set(c.scores) <= set(expected)
    floats = [v for v in c.scores.values() if v is not None]
    assert all(isinstance(v, float) and math.isfinite(v) and 1.0 <= v <= 4.0 for v in floats)
    assert c.overall == (pytest.approx(sum(floats) / len(floats)) if floats else None)
    assert c.readable == (c.overall is not None)
    for dim in expected:
        if dim not in c.scores:
            assert any(p.startswith(dim + ":") for p in c.problems), (dim, c.problems)
    if not c.refined_request:
        assert any("Refined Request" in p for p in c.problems)
    for s in (c.refined_request, c.refinement_comments, c.summary, c.analysis, *c.justifications.values()):
        assert isinstance(s, str) and s == s.strip()
    assert set(c.justifications) <= set(expected)
    assert isinstance(c.problems, tuple) and all(isinstance(p, str) and p for p in c.problems)


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JUNK = st.sampled_from([
    "## Score: 5", "## Score: 3", "Score: N/A", "<|im_end|>", "```", "---", "# Summary:", "## Refined Request:",
    "1. Text Faithfulness:", "2. Image Faithfulness: 3", "**", "#", "(", "3.5/4", "nan", "## Justification:",
    "Text Rendering: 9", "</think>", "\r", "\x00", "# User Request Refinement", "\u2028", "*" * 50, "1.",
])
SCORE_TEXT = st.one_of(
    st.sampled_from(["3", "2.5/4", "N/A", "n/a (none)", "5", "0", "7/10", "inf", "-nan", "", "**4**", "1e5", "3,5"]),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-10, 100).map(str),
    st.text(max_size=20),
)
TEXT = st.one_of(st.text(), st.text(alphabet="#*_:/.()0123456789 \n\r\tNnAa|<>`-", max_size=300), JUNK)


@FUZZ
@given(text=TEXT, task=st.sampled_from(sorted(DIMENSIONS)))
def test_never_raises_on_arbitrary_text(text, task):
    assert_consistent(parse_critique(text, task), task)


MUTATION = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 60)),
    st.tuples(st.just("swap"), st.integers(0, 60), st.integers(0, 60)),
    st.tuples(st.just("insert"), st.integers(0, 60), st.one_of(JUNK, st.text(max_size=40))),
    st.tuples(st.just("duplicate"), st.integers(0, 60)),
    st.tuples(st.just("score"), st.integers(0, 60), SCORE_TEXT),
)


@FUZZ
@given(task=st.sampled_from(sorted(DIMENSIONS)), mutations=st.lists(MUTATION, max_size=8),
       score_first=st.booleans(), analysis=st.booleans(), crlf=st.booleans())
def test_never_raises_on_mutated_critiques(task, mutations, score_first, analysis, crlf):
    lines = critique(task, score_first=score_first, analysis=analysis, refined="A fox.\nIn snow.").split("\n")
    for kind, i, *arg in mutations:
        i %= len(lines) or 1
        if kind == "drop" and lines:
            del lines[i]
        elif kind == "swap" and lines:
            j = arg[0] % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        elif kind == "insert":
            lines.insert(i, arg[0])
        elif kind == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif kind == "score":
            score_lines = [k for k, line in enumerate(lines) if line.startswith("## Score:")]
            if score_lines:
                lines[score_lines[i % len(score_lines)]] = "## Score: " + arg[0]
    text = "\r\n".join(lines) if crlf else "\n".join(lines)
    assert_consistent(parse_critique(text, task), task)


STYLE = dict(
    number=st.sampled_from(["{i}. ", "{i}) ", "({i}) ", "", "**{i}. ", "### {i}. "]),
    header=st.sampled_from(["{title}:", "**{title}**:", "**{title}:**", "## {title}", "{title}"]),
    score_line=st.sampled_from(["## Score: {value}", "**Score:** {value}", "## Score: **{value}**",
                                "Score: {value}/4", "## Score: {value} (reason)", "## Score:\n{value}"]),
    just_line=st.sampled_from(["## Justification: {text}", "**Justification:** {text}", "{text}"]),
)
VALUE = st.one_of(st.integers(4, 16).map(lambda q: q / 4), st.floats(1, 4).map(lambda x: round(x, 2)))


@FUZZ
@given(task=st.sampled_from(sorted(DIMENSIONS)), values=st.lists(VALUE, min_size=4, max_size=4),
       na=st.booleans(), score_first=st.booleans(), **STYLE)
def test_any_valid_critique_round_trips(task, values, na, score_first, **style):
    scores = dict(zip(DIMENSIONS["edit"], values))
    if na:
        scores["text_rendering"] = "N/A"
    c = parse_critique(critique(task, scores, score_first=score_first, **style), task)
    want = {d: (None if scores[d] == "N/A" else float(scores[d])) for d in DIMENSIONS[task]}
    assert c.problems == ()
    assert c.scores == want
    assert c.refined_request == "A red fox in snow at dusk."


@pytest.mark.parametrize("make", [
    lambda n: " " * n, lambda n: "#" * n, lambda n: "*" * n, lambda n: "1." * (n // 2), lambda n: "(" * n,
    lambda n: "## Score: " + "9" * n, lambda n: "## Score: " + "3." + "5" * n, lambda n: "Text" + " " * n + "x",
    lambda n: "Text Faithfulness" + " " * n + ":", lambda n: "Text Faithfulness: (" + "a" * n,
    lambda n: "## Score:\n" * (n // 10), lambda n: "## Refined Request: x\n```\n" * (n // 25),
    lambda n: "```\n\n" * (n // 5), lambda n: "<|" * (n // 2), lambda n: "N/A " * (n // 4),
    lambda n: "1. Text Faithfulness:\n## Score: 3\n" * (n // 30), lambda n: "\r" * n, lambda n: "a/" * (n // 2),
])
def test_pathological_200kb_inputs_return(make):
    text = make(200_000)
    assert len(text) >= 190_000
    assert_consistent(parse_critique(text, "edit"), "edit")
