"""Property: whatever a tenant writes, the models either accept it and it works, or refuse it
naming a field. Hypothesis mutates the example VoiceAgent spec at random (replace, delete or add
values anywhere, with a bias towards the tool parameter schema and the pipeline) and builds random
parameter schemas (voicefleet_testkit.specs); every outcome must be

- refused: SpecError, every line `spec.<field path>: <message>` (a bare `spec:` line must name
  the spec fields it is about), nothing else raised; or
- accepted and valid: the operator renders every child (or refuses with a ConfigError naming a
  field, which it reports as ConfigValid=False), the rendered runtime config loads in the runtime,
  and every tool schema passes the JSON Schema metaschema and the function-calling subset.

tests/integration/test_validation.py throws the same specs at the real API server.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from voicefleet_operator.api import SpecError, parse_spec
from voicefleet_testkit.specs import (
    SPEC,
    check_accepted,
    check_refusal,
    mutated_specs,
    parameter_schemas,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_every_mutated_spec_is_accepted_and_valid_or_refused_naming_a_field(
    spec: dict[str, Any],
) -> None:
    try:
        parsed = parse_spec(spec)
    except SpecError as error:
        event("refused")
        check_refusal(str(error))
        return
    event("accepted")
    check_accepted(parsed)


@settings(max_examples=300, deadline=None)
@given(parameter_schemas)
def test_every_parameter_schema_is_accepted_and_valid_or_refused_naming_it(
    parameters: dict[str, Any],
) -> None:
    spec = copy.deepcopy(SPEC)
    spec["tools"][0]["parameters"] = parameters
    try:
        parsed = parse_spec(spec)
    except SpecError as error:
        event("refused")
        message = str(error)
        assert message.startswith("spec.tools[0].parameters"), message
        check_refusal(message)
        return
    event("accepted")
    check_accepted(parsed)
