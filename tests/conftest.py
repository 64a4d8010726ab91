"""Shared pytest setup: a fast, deterministic hypothesis profile and a fresh decoder per test."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from mitherm.decoder import Decoder

settings.register_profile("mitherm", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mitherm"))


@pytest.fixture
def decoder() -> Decoder:
    return Decoder()
