"""telemetry/resource.py: OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES as the specification says,
and the attributes as Prometheus `target_info` labels."""

from __future__ import annotations

import logging

import pytest

from agproxy.telemetry.resource import (MalformedAttributes, label_name, parse_resource_attributes,
                                        resource_attributes, target_info_labels)


def test_pairs_are_trimmed_and_percent_decoded():
    assert parse_resource_attributes(" a = 1 ,b.c=x%20y,%3Dk=v%2Cw , ,") == {"a": "1", "b.c": "x y", "=k": "v,w"}
    assert parse_resource_attributes("emoji=%F0%9F%99%82,empty=") == {"emoji": "\U0001F642", "empty": ""}


@pytest.mark.parametrize("bad", ["novalue", "a=1,broken", "=v", "a=%zz", "a=%4", "a=%ff%fe", "%g1=v"])
def test_a_malformed_pair_is_an_error(bad):
    with pytest.raises(MalformedAttributes):
        parse_resource_attributes(bad)


def test_malformed_variable_is_ignored_whole_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="agproxy.telemetry"):
        attrs = resource_attributes({"OTEL_RESOURCE_ATTRIBUTES": "team=a,oops,zone=b"})
    assert "team" not in attrs and "zone" not in attrs
    assert attrs["service.name"] == "agproxy"
    assert [r.getMessage() for r in caplog.records] == ["OTEL_RESOURCE_ATTRIBUTES ignored: 'oops' is not key=value"]


def test_service_name_precedence():
    assert resource_attributes({})["service.name"] == "agproxy"
    assert resource_attributes({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"})["service.name"] == "from-attrs"
    both = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs", "OTEL_SERVICE_NAME": "winner"}
    assert resource_attributes(both)["service.name"] == "winner"
    assert resource_attributes({"OTEL_SERVICE_NAME": "  "})["service.name"] == "agproxy"


def test_sdk_attributes_present_and_overridable():
    attrs = resource_attributes({"OTEL_RESOURCE_ATTRIBUTES": "service.version=9"})
    assert attrs["telemetry.sdk.language"] == "python" and attrs["telemetry.sdk.name"] == "agproxy"
    assert attrs["service.version"] == "9"


def test_label_names_are_sanitised_and_collisions_joined_in_key_order():
    assert label_name("service.name") == "service_name"
    assert label_name("k8s.pod-name") == "k8s_pod_name"
    assert label_name("9lives") == "key_9lives"
    assert label_name("__meta") == "key__meta"
    assert label_name("héllo") == "h_llo"
    labels = target_info_labels({"a.b": "dot", "a-b": "dash", "a_b": "under", "x": 1})
    assert labels == {"a_b": "dash;dot;under", "x": "1"}    # '-' < '.' < '_'
