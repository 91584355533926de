"""Deploy weightship on Kubernetes with its Helm chart (``helm/weightship``).

Modules, in the order a deployment uses them:
- :mod:`~weightship.deploy.k8s.sizing`: GPU memory, host memory and disk a model needs;
- :mod:`~weightship.deploy.k8s.values`: chart values derived from the catalog card, then -f/--set;
- :mod:`~weightship.deploy.k8s.helm`: the Helm v4 engine (helm-python-sdk): render, lint;
- :mod:`~weightship.deploy.k8s.policy`: official schemas, restricted Pod Security, credentials;
- :mod:`~weightship.deploy.k8s.cluster` and :mod:`~weightship.deploy.k8s.preflight`: the cluster
  and what it must have;
- :mod:`~weightship.deploy.k8s.release`: install/upgrade, wait, status, rollback, uninstall;
- :mod:`~weightship.deploy.k8s.deployer`: all of it as ``plan`` then ``apply``.
"""

from weightship.deploy.k8s.deployer import Plan, apply, plan

__all__ = ["Plan", "apply", "plan"]
