"""The on-prem deployer: ``weightship deploy nodes`` rolls a model out to your own servers over SSH.

Modules: :mod:`.inventory` (nodes.yaml), :mod:`.ssh` (asyncssh, pinned host keys),
:mod:`.layout` (paths, releases and the systemd unit on a node), :mod:`.agent` (the helper that
runs on a node), :mod:`.want` (what a rollout wants, worked out here), :mod:`.preflight` (what
stops a host), :mod:`.steps` (one host's steps), :mod:`.rollout` (the rolling, gated rollout
and the commands that follow it).
"""
