"""`kubetune dev` argument handling: one-line errors, no ground needed."""
import pytest

from kubetune import cli


def test_unknown_action_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["dev", "bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'bogus'" in err[0]


def test_restart_needs_a_name(capsys):
    assert cli.main(["dev", "restart"]) == 2
    assert "restart needs the name" in capsys.readouterr().err


def test_bad_target(capsys):
    assert cli.main(["dev", "prometheus", "--target", "nohostport"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err


def test_status_of_a_ground_that_is_down(tmp_path, capsys):
    assert cli.main(["dev", "status", "--dir", str(tmp_path)]) == 3
    assert "ground is down" in capsys.readouterr().out


def test_env_of_a_ground_that_is_down_is_a_one_line_error(tmp_path, capsys):
    assert cli.main(["dev", "env", "--dir", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["-1", "x", "99"])
def test_bad_real_node_count_is_a_one_line_error(value, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["dev", "up", "--real-nodes", value])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--real-nodes" in err[0]


def test_real_nodes_only_for_up(tmp_path, capsys):
    assert cli.main(["dev", "status", "--dir", str(tmp_path), "--real-nodes", "1"]) == 2
    assert "--real-nodes is for `up`" in capsys.readouterr().err
