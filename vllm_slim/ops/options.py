"""User knobs from vLLM's `--additional-config '{"<backend>": {...}}'` into a policy dataclass."""


def policy_from_options(policy_cls, options: dict, section: str, error: type[Exception] = ValueError):
    """`policy_cls(**options)`, refusing by name any key the policy does not have."""
    known = set(policy_cls.__dataclass_fields__)
    unknown = set(options) - known
    if unknown:
        raise error(f"unknown {section} option(s) {sorted(unknown)}; known: {sorted(known)}")
    return policy_cls(**options)
