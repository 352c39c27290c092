#!/usr/bin/env python3
"""Prints the newest Kubernetes version whose schemas kubernetes-validate bundles (for
tests/suites/40-kubernetes.sh; run with the .venv's python, which has kubernetes-validate)."""

import sys

from kubernetes_validate import utils

sys.dont_write_bytecode = True

print(utils.latest_version())
