"""in_netns's errors name the path and say what went wrong: a file that is no netns is
told apart from a netns that may not be entered."""

import errno

import pytest

from meshaccel.datapath import netns
from meshaccel.errors import MeshaccelError


@pytest.mark.parametrize(
    ("err", "message"),
    [
        (errno.EINVAL, "--netns {path}: not a network namespace"),
        (
            errno.EPERM,
            "--netns {path}: cannot enter this network namespace (Operation not permitted)",
        ),
    ],
)
def test_a_netns_that_cannot_be_entered_is_named(err, message, monkeypatch, tmp_path):
    path = tmp_path / "ns"
    path.write_text("")

    def refuse(fd: int) -> None:
        raise OSError(err, "setns")

    monkeypatch.setattr(netns, "enter", refuse)
    with pytest.raises(MeshaccelError) as e:
        netns.in_netns(str(path), lambda: None)
    assert str(e.value) == message.format(path=path)
