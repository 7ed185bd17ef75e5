"""Kubernetes label selectors: matching and a canonical text form.

``matches`` is metav1.LabelSelector semantics: every matchLabels pair AND every expression;
``In`` needs the key with one of the values, ``NotIn`` matches when the key is absent or its
value is not listed, ``Exists`` / ``DoesNotExist`` test the key only. The empty selector
matches everything. ``canonical`` is stable across runs and nodes (set names hash it).
"""

from __future__ import annotations

from collections.abc import Mapping

from fabric.resources.policy_model import LabelSelector, Operator, Requirement


def requirement_matches(r: Requirement, labels: Mapping[str, str]) -> bool:
    if r.operator is Operator.IN:
        return r.key in labels and labels[r.key] in r.values
    if r.operator is Operator.NOT_IN:
        return r.key not in labels or labels[r.key] not in r.values
    if r.operator is Operator.EXISTS:
        return r.key in labels
    return r.key not in labels


def matches(sel: LabelSelector, labels: Mapping[str, str]) -> bool:
    for k, v in sel.match_labels:  # loops, not all(): this runs per endpoint per selector
        if labels.get(k) != v:
            return False
    return all(requirement_matches(r, labels) for r in sel.match_expressions)


def canonical(sel: LabelSelector) -> str:
    """``k=v,k2 in (a,b),!k3`` with terms sorted and de-duplicated; ``""`` selects all."""
    terms = {f"{k}={v}" for k, v in sel.match_labels}
    for r in sel.match_expressions:
        vals = ",".join(sorted(set(r.values)))
        terms.add({Operator.IN: f"{r.key} in ({vals})", Operator.NOT_IN: f"{r.key} notin ({vals})",
                   Operator.EXISTS: r.key, Operator.DOES_NOT_EXIST: f"!{r.key}"}[r.operator])  # fmt: skip
    return ",".join(sorted(terms))


def describe(sel: LabelSelector) -> str:
    """For people: ``{app=a}``, ``{}`` (all)."""
    return "{" + canonical(sel) + "}"
