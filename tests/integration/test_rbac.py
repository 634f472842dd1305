"""The apiserver runs with RBAC: the non-admin token gets only what its RoleBinding grants."""
from __future__ import annotations

import pytest

from kubetune.devenv import render

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("verb,resource,namespace,allowed", [
    ("list", "pods", "default", True),            # the built-in `view` role, bound in `default`
    ("get", "configmaps", "default", True),
    ("create", "pods", "default", False),
    ("delete", "jobs.batch", "default", False),
    ("list", "pods", "kube-system", False),
    ("get", "secrets", "default", False),         # `view` deliberately excludes secrets
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None, False),
    ("create", "finetunejobs.kubetune.io", "default", False),
])
def test_non_admin_can_i(ground, verb, resource, namespace, allowed):
    ns = ["-n", namespace] if namespace else []
    res = ground.kubectl("auth", "can-i", verb, resource, *ns, user=True, check=False)
    assert res.stdout.strip() == ("yes" if allowed else "no"), res.stderr


def test_non_admin_is_forbidden_by_the_apiserver(ground):
    res = ground.kubectl("get", "pods", "-n", "kube-system", user=True, check=False)
    assert res.returncode != 0
    assert (f'User "{render.DEV_USER}" cannot list resource "pods" in API group "" in the namespace '
            '"kube-system"') in res.stderr
    res = ground.kubectl("create", "configmap", "nope", "-n", "default", user=True, check=False)
    assert "forbidden" in res.stderr and "cannot create resource" in res.stderr


def test_non_admin_reads_what_it_is_granted(ground):
    assert ground.kubectl("get", "pods", "-n", "default", user=True).returncode == 0


def test_admin_token_is_cluster_admin(ground):
    assert ground.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"
    who = ground.kubectl_json("auth", "whoami")
    assert who["status"]["userInfo"]["username"] == render.ADMIN_USER


def test_a_wrong_token_is_unauthorized(ground):
    res = ground.kubectl("--token", "not-a-token", "get", "ns", check=False)
    assert res.returncode != 0 and "Unauthorized" in res.stderr
