"""The one registry mechanism: lookup, normalisation, suggestions, duplicates."""

import pytest

from generalist.registry import Registry


class PartError(ValueError):
    pass


def test_register_get_and_names_are_normalised():
    reg = Registry("part", error=PartError)

    @reg.register("Fast-Thing")
    def fast():
        return 1

    assert reg.get("fast_thing") is fast and reg.get(" FAST-thing ") is fast
    assert "fast-thing" in reg and "other" not in reg
    assert reg.names() == ["fast_thing"]


def test_unknown_name_suggests_the_closest_and_lists_all():
    reg = Registry("part", error=PartError, extra_names=lambda: ["tv.extra"], hint="Add one.")
    reg.add("alpha", object())
    reg.add("beta", object())
    with pytest.raises(PartError, match=r"unknown part 'alpah'; did you mean 'alpha'\? known parts: "
                                        r"alpha, beta, tv.extra\. Add one\."):
        reg.get("alpah")


def test_duplicate_names_are_refused_but_re_registering_the_same_object_is_not():
    reg = Registry("part", error=PartError)
    thing = object()
    reg.add("x", thing)
    reg.add("X", thing)
    with pytest.raises(PartError, match="already registered"):
        reg.add("x", object())
    with pytest.raises(PartError, match="invalid part name"):
        reg.add("a:b", object())
