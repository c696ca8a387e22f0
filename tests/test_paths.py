"""``cellseg.paths.git_commit``: the one commit lookup (checkpoint provenance and the bundle marker)."""

from __future__ import annotations

import subprocess

from cellseg.paths import git_commit


def git(repo, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_is_the_head_hash_with_a_dirty_marker(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.txt").write_text("1\n")
    git(repo, "add", "a.txt")
    git(repo, "commit", "-q", "-m", "first")
    git(repo, "tag", "-a", "v1", "-m", "a release")  # a tag name never replaces the hash
    head = git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == head and len(head) == 40
    (repo / "untracked.txt").write_text("x\n")
    assert git_commit(repo) == head  # untracked files do not make it dirty
    (repo / "a.txt").write_text("2\n")
    assert git_commit(repo) == head + "-dirty"
    assert git_commit(tmp_path) is None  # not a checkout
