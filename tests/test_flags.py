"""One flag vocabulary across train.py, sample.py, eval_fid.py and eval_fid.py compare, old spellings accepted for
one release with a deprecation line."""

import pytest

from uvic import evaluate, sampling, train_cli

# the options every command that samples a model shares, spelled alike (README "Sample", "Evaluation")
SAMPLING_FLAGS = {"--scheduler", "--steps", "--timestep-spacing", "--guidance", "--seed", "--batch-size", "--device",
                  "--prompts", "--no-progress", "--debug"}
SCORING_FLAGS = {"--ref", "--isc", "--no-isc", "--kid", "--no-kid", "--prc", "--no-prc", "--samples-dir", "--csv",
                 "--feature-extractor", "--allow-resize"}


def flags(parser) -> set:
    return {option for action in parser._actions for option in action.option_strings}


def test_sample_eval_and_compare_share_the_sampling_and_scoring_flags():
    eval_flags, compare_flags = flags(evaluate.build_parser()), flags(evaluate.build_compare_parser())
    assert SAMPLING_FLAGS - {"--debug"} <= flags(sampling.build_parser()), SAMPLING_FLAGS - flags(sampling.build_parser())
    for have in (eval_flags, compare_flags):
        assert SAMPLING_FLAGS | SCORING_FLAGS <= have, (SAMPLING_FLAGS | SCORING_FLAGS) - have


@pytest.mark.parametrize("command, defaults", [([], dict(isc=False, kid=False)), (["compare"], dict(isc=True, kid=True))])
def test_isc_and_kid_flags_switch_either_way_in_both_commands(command, defaults):
    parser = evaluate.build_compare_parser() if command else evaluate.build_parser()
    base = ["RUN", "--num-samples", "4"] if command else ["RUN"]
    assert {k: getattr(parser.parse_args(base), k) for k in defaults} == defaults
    args = parser.parse_args([*base, "--isc", "--no-kid", "--csv", "rows.csv", "--timestep-spacing", "trailing"])
    assert (args.isc, args.kid, args.csv, args.timestep_spacing) == (True, False, "rows.csv", "trailing")


def test_the_old_samples_out_spelling_works_with_one_deprecation_line(capsys):
    args = evaluate.build_parser().parse_args(["RUN", "--samples-out", "sets/x"])
    assert args.samples_dir == "sets/x"
    lines = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
    assert lines == ["eval_fid.py: --samples-out is deprecated and will be removed in the next release: use --samples-dir"]


def test_train_takes_out_like_the_other_commands():
    assert train_cli.parse_args(["--out", "runs/x"]).output_dir == train_cli.parse_args(["--output-dir", "runs/x"]).output_dir


def test_compare_writes_its_report_under_runs_not_docs():
    assert evaluate.build_compare_parser().parse_args(["RUN", "--num-samples", "4"]).out == "runs/compare"
