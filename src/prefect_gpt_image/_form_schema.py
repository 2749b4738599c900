"""How an option reads in Prefect's run form: a field left unset is an empty input.

Prefect's form shows a parameter typed `X | None` as tabs, one of them reading *Property is
type "None"*, and pre-fills every default it is given, None included, which its own checks
then refuse for a choice. Here a field whose default is None has no null in its form and no
default there: it shows as a plain input or select, and a run that leaves it empty sends
nothing, which the model reads as None. Python callers still pass None.
"""

from __future__ import annotations

from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    model_serializer,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema


def without_null(schema: dict[str, Any]) -> None:
    """Drop the null choice and a None default from one field's JSON schema, in place."""
    if "default" in schema and schema["default"] is None:
        del schema["default"]
    if "anyOf" in schema:
        choices = [choice for choice in schema["anyOf"] if choice.get("type") != "null"]
        del schema["anyOf"]
        if len(choices) == 1:
            schema.update(choices[0])
        else:
            schema["anyOf"] = choices
    if None in schema.get("enum", ()):
        schema["enum"] = [value for value in schema["enum"] if value is not None]
        schema.setdefault("type", "string")


class EmptyInForm:
    """`Annotated` marker for a flow parameter that may be None: the form shows its input,
    not a None tab."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        without_null(schema)
        return schema


def _fields_without_null(schema: dict[str, Any]) -> None:
    for field in schema.get("properties", {}).values():
        without_null(field)


class OptionGroup(BaseModel):
    """A group of the flow's options: a section of the run form.

    Strict (a misspelt field is refused, naming it), frozen, and dumped without the fields
    left at None, so that the form's defaults hold no None to refuse.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_fields_without_null)

    @model_serializer(mode="wrap")
    def _without_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        return {name: value for name, value in dumped.items() if value is not None}

    def given(self) -> dict[str, Any]:
        """The fields a run set to something other than their default: what the
        environment's settings do not replace. A form sends every default it shows, so a
        default sent back is not a choice."""
        fields = type(self).model_fields
        return {
            name: getattr(self, name)
            for name in self.model_fields_set
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        }
