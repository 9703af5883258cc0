"""``xrdscale campaign run|status|report`` from the command line: help, bad input, status."""

from __future__ import annotations

import os
import socket

import pytest
import yaml

import campaign_doubles as doubles
from xrdscale.campaign.runner import Plan, Runner, open_job_store
from xrdscale.campaign.spec import load_spec


@pytest.mark.parametrize("cmd", [[], ["run"], ["status"], ["report"]])
def test_help(xrdscale_cli, cmd):
    code, out, _ = xrdscale_cli("campaign", *cmd, "--help")
    assert code == 0 and "Usage" in out


def test_spec_typo_exits_nonzero_with_yaml_path(tmp_path, xrdscale_cli):
    path = doubles.make_campaign(tmp_path, 1, extra={"pipeline": {"integrat": {"npt": 10}}})
    code, _, err = xrdscale_cli("campaign", "run", path)
    assert code == 1 and "pipeline.integrat: unknown key" in " ".join(err.split())
    assert not os.path.exists(tmp_path / "work")


def test_unreachable_cluster_exits_nonzero_and_starts_nothing(tmp_path, xrdscale_cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = doubles.make_campaign(tmp_path, 1)
    code, _, err = xrdscale_cli("campaign", "run", path, "--cluster", f"tcp://127.0.0.1:{port}")
    err = " ".join(err.split())
    assert code == 1 and f"cannot reach the Dask scheduler at tcp://127.0.0.1:{port}" in err
    assert not os.path.exists(tmp_path / "work")


def test_a_workspace_under_a_file_is_refused_and_nothing_is_created(tmp_path, xrdscale_cli):
    (tmp_path / "plain").write_text("not a folder")
    path = doubles.make_campaign(tmp_path, 1, workspace="plain/work")
    code, _, err = xrdscale_cli("campaign", "run", path)
    err = " ".join(err.split())
    assert code == 1 and "is not writable" in err and "is a file, not a folder" in err, err
    assert (tmp_path / "plain").read_text() == "not a folder"


def test_missing_raw_file_exits_nonzero(tmp_path, xrdscale_cli):
    path = doubles.make_campaign(tmp_path, 2)
    os.remove(tmp_path / "raw" / "d1.npy")
    code, _, err = xrdscale_cli("campaign", "run", path)
    assert code == 1 and "dataset d1: raw" in err and "nothing was run" in " ".join(err.split())


def test_status_after_a_run(tmp_path, xrdscale_cli):
    path = doubles.make_campaign(tmp_path, 1)
    code, out, _ = xrdscale_cli("campaign", "status", path)
    assert code == 0 and "has not been run yet" in out
    spec = load_spec(path)
    store = open_job_store(spec)
    Runner(Plan(spec, doubles.stages()), store).run()
    store.close()
    code, out, _ = xrdscale_cli("campaign", "status", path)
    assert code == 0
    for stage in ("library", "train", "integrate", "sinogram", "reconstruct", "analyse", "report"):
        assert stage in out
    assert "done" in out and "1 run(s)" in out


def test_workspace_override_on_the_command_line(tmp_path, xrdscale_cli):
    path = doubles.make_campaign(tmp_path, 1)
    other = tmp_path / "elsewhere"
    code, out, _ = xrdscale_cli("campaign", "status", path, "--workspace", str(other))
    assert code == 0 and "has not been run yet" in out and str(other) in out
    with open(path) as f:
        assert yaml.safe_load(f)["workspace"] == "work"
