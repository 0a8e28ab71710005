"""Rendering and submitting sbatch scripts, without a Slurm cluster.

The rendered scripts are compared with golden files in ``tests/golden``;
``DATACLAY_HPC_UPDATE_GOLDEN=1`` rewrites them. ``sbatch`` is faked by a script
on ``PATH``.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run

from dataclay_hpc.exceptions import JobError
from dataclay_hpc.slurm import render_job_script, slurm_time

GOLDEN = Path(__file__).resolve().parent / "golden"
PYTHON = "/opt/venv/bin/python"
CLI = [sys.executable, "-m", "dataclay_hpc"]
WEIRD = ["a b", "it's", 'say "hi"', "$HOME", "`id`", "x;y", "*", "", "\\n", "é"]

CASES = {
    "backends-only": dict(command=["python", "app.py"], backends=3),
    "one-node": dict(
        command=["python", "app.py", "--size", "10"],
        nodes=1,
        ntasks=4,
        time_limit_min=10,
        signal_warning_s=60,
        output="dataclay-hpc-%j.out",
    ),
    "multi-node": dict(
        command=["python", "app.py"],
        job_name="big run",
        nodes=4,
        ntasks_per_node=8,
        time_limit_min=1500,
        storage="/scratch/my project/store",
        interface="ib0",
        signal_warning_s=300,
        partition="compute",
        account="proj-42",
        output="/home/me/job's output/%j.out",
        extra_sbatch=["--mem=8G", "--exclusive"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_matches_its_golden_file(name):
    script = render_job_script(**CASES[name], python=PYTHON)
    golden = GOLDEN / f"{name}.sh"
    if os.environ.get("DATACLAY_HPC_UPDATE_GOLDEN") == "1":
        golden.write_text(script)
    assert script == golden.read_text(), (
        f"{golden} differs; rerun with DATACLAY_HPC_UPDATE_GOLDEN=1 if the change "
        "is intended"
    )


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_script_is_valid_bash(name, tmp_path):
    path = tmp_path / "job.sh"
    path.write_text(render_job_script(**CASES[name], python=PYTHON))
    result = run(["bash", "-n", str(path)], timeout_s=10)
    assert result.returncode == 0, result.stderr


def test_only_the_directives_asked_for_are_emitted():
    script = render_job_script(["python", "app.py"])
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert directives == ["#SBATCH --job-name=dataclay-hpc"]
    assert "--backends" not in script and "export" not in script


def test_the_backends_fill_every_task_but_one():
    script = render_job_script(["app"], nodes=2, ntasks_per_node=3)
    assert "--backends 5 --" in script
    assert "--ntasks=" not in script
    assert "--backends 1 --" in render_job_script(["app"], ntasks=2)
    assert "#SBATCH --ntasks=3" in render_job_script(["app"], backends=2)


@pytest.mark.parametrize(
    ("minutes", "expected"),
    [
        (1, "00:01:00"),
        (59, "00:59:00"),
        (90, "01:30:00"),
        (1440, "1-00:00:00"),
        (1561, "1-02:01:00"),
        (10 * 1440 + 5, "10-00:05:00"),
    ],
)
def test_slurm_time_converts_minutes(minutes, expected):
    assert slurm_time(minutes) == expected


def _sbatch_values(script: str) -> dict[str, str]:
    values = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            (word,) = shlex.split(line[len("#SBATCH ") :])
            option, _, value = word.partition("=")
            values[option] = value
    return values


def test_directive_values_with_spaces_and_quotes_round_trip():
    output = '/home/me/it\'s a "dir"/out-%j.txt'
    script = render_job_script(
        ["app"],
        job_name="my 'job' $1",
        output=output,
        account="a b",
        extra_sbatch=["--comment=it's here"],
    )
    values = _sbatch_values(script)
    assert values["--comment"] == "it's here"
    assert values["--job-name"] == "my 'job' $1"
    assert values["--output"] == output
    assert values["--account"] == "a b"


def test_weird_paths_and_arguments_reach_the_launcher_unchanged(tmp_path):
    # a fake interpreter prints what the script runs it with, one item per line
    folder = tmp_path / 'it\'s a "folder" $x'
    folder.mkdir()
    fake_python = folder / "py thon"
    fake_python.write_text(
        "#!/bin/bash\n"
        'printf \'%s\\n\' "$DATACLAY_HPC_STORAGE" "$DATACLAY_HPC_INTERFACE" "$@"\n'
    )
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)
    storage = str(folder / "st ore")
    command = ["printf", "%s\\n", *WEIRD]
    script = tmp_path / "job.sh"
    script.write_text(
        render_job_script(
            command,
            ntasks=3,
            storage=storage,
            interface="e th0",
            python=str(fake_python),
        )
    )

    result = run(["bash", str(script)], timeout_s=10)

    assert result.returncode == 0, result.stderr
    expected = [storage, "e th0", "-m", "dataclay_hpc", "run", "--backends", "2"]
    expected += ["--storage", storage, "--", *command]
    assert result.stdout.split("\n")[:-1] == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(nodes=0), "nodes must be a whole number of at least 1; got 0"),
        (dict(ntasks=-2), "ntasks must be a whole number of at least 1; got -2"),
        (dict(ntasks_per_node=2.5), "ntasks_per_node must be a whole number"),
        (dict(backends=True), "backends must be a whole number of at least 1; got "),
        (dict(time_limit_min=0), "time_limit_min must be a whole number"),
        (dict(signal_warning_s=0), "signal_warning_s must be a whole number"),
        (dict(signal_warning_s=70000), "from 1 to 65535; got 70000"),
        (
            dict(signal_warning_s=600, time_limit_min=10),
            "signal_warning_s must be shorter than the time limit (600 s); got 600",
        ),
        (dict(job_name="a\nb"), "job_name must be a non-empty string on one line"),
        (dict(storage=""), "storage must be a non-empty string on one line"),
        (dict(extra_sbatch=["mem=8G"]), "got 'mem=8G': pass for example"),
        (dict(ntasks=1), "a job needs at least 2 tasks"),
        (
            dict(backends=4, nodes=2, ntasks_per_node=2),
            "backends=4 needs 5 tasks (1 coordinator + 4 backends) but the options "
            "give 4: pass ntasks=5",
        ),
    ],
)
def test_bad_options_name_the_option_the_value_and_the_fix(options, message):
    with pytest.raises(JobError, match=r"pass|give") as caught:
        render_job_script(["app"], **options)
    assert message in str(caught.value)


@pytest.mark.parametrize("command", [[], "python app.py", ["python", 3]])
def test_a_bad_command_is_refused(command):
    with pytest.raises(JobError, match="command must"):
        render_job_script(command)


# -- the command line ---------------------------------------------------------------


def test_submit_dry_run_prints_the_rendered_script(tmp_path):
    result = run(
        [
            *CLI,
            "submit",
            "--dry-run",
            "--nodes",
            "2",
            "--ntasks-per-node",
            "3",
            "--time-min",
            "30",
            "--storage",
            "my store",
            "--interface",
            "ib0",
            "--signal-warning-s",
            "60",
            "--job-name",
            "it's",
            "--partition",
            "p",
            "--account",
            "a",
            "--output",
            "o %j",
            "--sbatch-option=--mem=1G",
            "--sbatch-option=--exclusive",
            "--",
            "python",
            "app.py",
            "a b",
        ],
        timeout_s=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_job_script(
        ["python", "app.py", "a b"],
        job_name="it's",
        nodes=2,
        ntasks_per_node=3,
        time_limit_min=30,
        storage="my store",
        interface="ib0",
        signal_warning_s=60,
        partition="p",
        account="a",
        output="o %j",
        extra_sbatch=["--mem=1G", "--exclusive"],
        python=sys.executable,
    )
    assert list(tmp_path.iterdir()) == []


def test_submit_with_a_bad_option_exits_2_with_the_message():
    result = run([*CLI, "submit", "--dry-run", "--nodes", "0", "--", "app"])
    assert result.returncode == 2
    assert "nodes must be a whole number of at least 1; got 0" in result.stderr


def test_submit_without_a_command_is_refused():
    result = run([*CLI, "submit", "--dry-run"], timeout_s=60)
    assert result.returncode == 2
    assert "submit needs a command" in result.stderr


def _fake_sbatch(folder: Path, body: str) -> dict[str, str]:
    sbatch = folder / "sbatch"
    sbatch.write_text("#!/bin/bash\n" + body)
    sbatch.chmod(sbatch.stat().st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}")


def test_submit_writes_the_script_and_prints_the_job_id(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = _fake_sbatch(
        bin_dir,
        f'printf "%s\\n" "$@" > {shlex.quote(str(tmp_path))}/args\n'
        'echo "4242;cluster"\n',
    )
    work = tmp_path / "it's work"
    work.mkdir()

    result = run(
        [*CLI, "submit", "--ntasks", "3", "--", "python", "app.py"],
        timeout_s=60,
        cwd=work,
        env=env,
    )

    assert result.returncode == 0, result.stderr
    assert "submitted job 4242" in result.stdout
    (script,) = work.glob("dataclay-hpc-*.sbatch")
    assert f"job script: {script}" in result.stdout
    assert (tmp_path / "args").read_text().split("\n")[:-1] == [
        "--parsable",
        str(script),
    ]
    assert "--backends 2 -- python app.py" in script.read_text()


def test_a_failed_sbatch_reports_command_exit_code_and_output(tmp_path):
    env = _fake_sbatch(
        tmp_path,
        'echo "some output"\n'
        'echo "sbatch: error: invalid partition specified: nope" >&2\nexit 1\n',
    )
    script = tmp_path / "my job.sbatch"

    result = run(
        [*CLI, "submit", "--script", str(script), "--partition", "nope", "--", "app"],
        timeout_s=60,
        cwd=tmp_path,
        env=env,
    )

    assert result.returncode == 2
    assert f"['sbatch', '--parsable', '{script}'] failed with exit code 1" in (
        result.stderr
    )
    assert "stdout: 'some output'" in result.stderr
    assert "invalid partition specified: nope" in result.stderr
    assert "--partition=nope" in script.read_text()


def test_submit_without_sbatch_says_so(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path))
    result = subprocess.run(
        [*CLI, "submit", "--", "app"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert result.returncode == 2
    assert "no sbatch on PATH" in result.stderr
