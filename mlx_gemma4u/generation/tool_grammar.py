"""Gemma 4's tool-call syntax as a Lark grammar, built from the functions' JSON schemas.

    <|tool_call>call:NAME{key:value,...}<tool_call|>

Keys are bare words, in sorted order (as the chat template writes them); strings are wrapped in
the `<|"|>` token; numbers, true, false, null, [arrays] and {objects} are written as in JSON, with
no spaces. The grammar holds a call to one of the functions, with each property of its
`parameters` typed as declared, every required one present and no other, so that mlx-lm's Gemma 4
tool parser reads it. Of the bounds on values only these are held: a string's minLength and
maxLength (its characters then exclude '<') and a minimum of 0 or more (no sign); patterns,
formats and other bounds are not.
"""

from __future__ import annotations

import json
import re

from mlx_gemma4u.errors import InputError

CALL_START, CALL_END, QUOTE, RESPONSE = "<|tool_call>", "<tool_call|>", '<|"|>', "<|tool_response>"
# Gemma 4's ids for them: every Gemma 4 checkpoint shares the tokenizer (GrammarMask checks its own)
TOOL_TOKENS = {CALL_START: 48, CALL_END: 49, RESPONSE: 50, QUOTE: 52}
WORD = re.compile(r"\w+")
NAME = re.compile(r"[\w-]+")
TERMINALS = r"""
STRING_TEXT: /(?s:([^<]|<+[^<|])*<*)/
KEY: /\w+/
INT: /-?(0|[1-9][0-9]{0,17})/
UINT: /0|[1-9][0-9]{0,17}/
NUMBER: /-?(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,2})?/
UNUMBER: /(0|[1-9][0-9]{0,17})(\.[0-9]{1,17})?([eE][+-]?[0-9]{1,2})?/
"""


def call_grammar(tools: list[dict], names: list[str], ids: dict[str, int], opened: bool) -> str:
    """Lark text for one or more calls to the functions `names` of `tools` (OpenAI's form:
    {"type": "function", "function": {"name", "parameters"}}). ids: TOOL_TOKENS' token ids.
    opened: the call's `<|tool_call>` is already written (the grammar starts
    after it, and holds this one call); else the grammar is one or more whole calls."""
    functions = {f["name"]: f for f in _functions(tools)}
    rules = _Rules(ids[QUOTE])
    calls = []
    for name in names:
        if name not in functions:
            raise InputError(f"tool_choice names {name!r}, which is not among the request's tools.")
        parameters = functions[name].get("parameters") or {"type": "object", "properties": {}}
        rules.defs, rules.scope = parameters.get("$defs") or parameters.get("definitions") or {}, name
        arguments = rules.value(parameters, f"the parameters of {name!r}")
        calls.append(f'"call:{name}" {arguments} <[{ids[CALL_END]}]>')
    body = " | ".join(f"({c})" for c in calls)
    if opened:
        start = f"start: {body}"
    else:  # calls, then the end of turn or the tool response the model waits for
        start = f"start: call+ (<[{ids[RESPONSE]}]>)?\ncall: <[{ids[CALL_START]}]> ({body})"
    return "\n".join([start, *rules.lines, TERMINALS])


def tool_names(tools: list[dict]) -> list[str]:
    return [f["name"] for f in _functions(tools)]


def _functions(tools: list[dict]) -> list[dict]:
    """The functions of OpenAI-form tools, their names checked against the call syntax."""
    functions = []
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise InputError(f"A tool's function needs a name of letters, digits, _ or -, got {name!r}.")
        functions.append(function)
    return functions


class _Rules:
    """Lark rules for JSON-schema values in Gemma 4's argument syntax, one rule per schema met."""

    def __init__(self, quote: int):
        self.quote = f"<[{quote}]>"
        self.lines: list[str] = []
        self.defs: dict = {}  # the $defs of the function whose parameters are being written
        self.scope = ""  # that function's name: a "$ref" means its own $defs
        self.named: dict[str, str] = {}  # "scope $ref" (and "any", "any object") -> its rule

    def value(self, schema, where: str) -> str:
        """A Lark expression for one value of `schema`."""
        if schema is True or schema == {}:
            return self._any()
        if not isinstance(schema, dict):
            raise InputError(f"The schema of {where} must be an object, got {schema!r}.")
        if "$ref" in schema:
            return self._ref(schema["$ref"], where)
        if "const" in schema:
            return self._literal(schema["const"])
        if "enum" in schema:
            return "(" + " | ".join(self._literal(v) for v in schema["enum"]) + ")"
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return "(" + " | ".join(self.value(s, where) for s in schema[key]) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(self.value({**schema, "type": k}, where) for k in kind) + ")"
        return self._typed(kind, schema, where)

    def _typed(self, kind, schema: dict, where: str) -> str:
        unsigned = isinstance(schema.get("minimum"), (int, float)) and schema["minimum"] >= 0
        simple = {
            "string": f"{self.quote} {self._text(schema)} {self.quote}",
            "integer": "UINT" if unsigned else "INT",
            "number": "UNUMBER" if unsigned else "NUMBER",
            "boolean": '("true" | "false")',
            "null": '"null"',
        }
        if kind in simple:
            return simple[kind]
        if kind == "array":
            item = self.value(schema.get("items", {}), f"an item of {where}")
            return f'"[" ({item} ("," {item})*)? "]"'
        if kind == "object" or (kind is None and "properties" in schema):
            return self._object(schema, where)
        if kind is None:
            return self._any()
        raise InputError(f"The schema of {where} has type {kind!r}, which is not a JSON Schema type.")

    @staticmethod
    def _text(schema: dict) -> str:
        """A string's text; with minLength / maxLength, that many characters, none of them '<'."""
        low, high = schema.get("minLength"), schema.get("maxLength")
        if not isinstance(low, int) and not isinstance(high, int):
            return "STRING_TEXT"
        low = low if isinstance(low, int) and low > 0 else 0
        return f"/(?s:[^<]{{{low},{high if isinstance(high, int) else ''}}})/"

    def _object(self, schema: dict, where: str) -> str:
        """Properties in sorted order, the required ones present, commas only between those written."""
        properties = schema.get("properties") or {}
        if not properties:
            return self._any_object() if schema.get("additionalProperties", True) is not False else '"{" "}"'
        required = set(schema.get("required") or [])
        keys = sorted(properties)
        for key in keys:
            if not WORD.fullmatch(key):
                raise InputError(f"Property {key!r} of {where} is not a bare word, as Gemma 4's call syntax needs.")
        after = first = ""  # after: the properties past i, each behind its comma; first: from i, the first bare
        for key in reversed(keys):
            pair = f'"{key}:" {self.value(properties[key], f"{key!r} of {where}")}'
            lead = f"({pair} {after})"
            if key in required:
                first, after = lead, self._rule(f'"," {pair} {after}')
            else:
                first = f"({lead} | {first})" if first else f"{lead}?"
                after = self._rule(f'("," {pair})? {after}')
        return f'"{{" {first} "}}"'

    def _ref(self, ref: str, where: str) -> str:
        key = f"{self.scope} {ref}"
        if key not in self.named:
            match = re.fullmatch(r"#/(\$defs|definitions)/(.+)", str(ref))
            if not match or match.group(2) not in self.defs:
                raise InputError(f"The schema of {where} refers to {ref!r}, which it does not define.")
            self.named[key] = self._rule('""')  # named first, so that a schema may refer to itself
            self._set(self.named[key], self.value(self.defs[match.group(2)], ref))
        return self.named[key]

    def _literal(self, value) -> str:
        """One enum or const value, as Lark text: a string inside its quote tokens, a scalar as written."""
        if isinstance(value, str):
            return f"{self.quote} {json.dumps(value, ensure_ascii=False)} {self.quote}"
        if value is None or isinstance(value, (bool, int, float)):
            return json.dumps(json.dumps(value))
        raise InputError(
            f"Enum and const values in tool parameters must be strings, numbers, booleans or null, got {value!r}."
        )

    def _any(self) -> str:
        """Any value, any object: rules made once."""
        if "any" not in self.named:
            value, obj = self._rule('""'), self._rule('""')
            self.named.update({"any": value, "any object": obj})
            string = f"{self.quote} STRING_TEXT {self.quote}"
            array = f'"[" ({value} ("," {value})*)? "]"'
            self._set(value, f'{string} | NUMBER | "true" | "false" | "null" | {obj} | {array}')
            pair = f'KEY ":" {value}'
            self._set(obj, f'"{{" ({pair} ("," {pair})*)? "}}"')
        return self.named["any"]

    def _any_object(self) -> str:
        self._any()
        return self.named["any object"]

    def _rule(self, body: str) -> str:
        name = f"r{len(self.lines)}"
        self.lines.append(f"{name}: {body}")
        return name

    def _set(self, name: str, body: str) -> None:
        self.lines[int(name[1:])] = f"{name}: {body}"
