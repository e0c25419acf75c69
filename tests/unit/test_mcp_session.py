from agproxy.mcp.session import SessionSeal, identity_of


def test_seal_opens_only_for_the_same_identity_and_id():
    seal = SessionSeal(b"k" * 32)
    alice, bob = identity_of({"iss": "https://idp", "sub": "alice"}), identity_of({"iss": "https://idp", "sub": "bob"})
    sealed = seal.seal(alice, "abc.def")
    assert sealed.startswith("abc.def.") and seal.open(alice, sealed) == "abc.def"
    assert seal.open(bob, sealed) is None
    assert seal.open(alice, "abc.def") is None                     # no tag
    assert seal.open(alice, "other." + sealed.rsplit(".", 1)[1]) is None
    assert SessionSeal(b"x" * 32).open(alice, sealed) is None      # another gateway's key
    # iss and sub are separated: ("a", "b\0c") is not ("a\0b", "c")
    assert identity_of({"iss": "a", "sub": "b"}) != identity_of({"iss": "a\x00b", "sub": ""})
