"""A suite of real-world-shaped JSON Schemas for structured output: public API payloads, tool (function) definitions
and configuration formats, written for dgemma in the styles those sources use (OpenAPI formats such as `binary`,
`int64` and `double`, `nullable`, unanchored patterns, `$defs`/`$ref`, strict tool schemas, paginated envelopes).

`suite()` returns (name, schema) pairs: 50 base schemas, each also in four common variants, 250 in all.
"""

from __future__ import annotations

import copy
from typing import Any

S, INT, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}


def obj(required: list[str] | None = None, **props: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = required
    return out


def arr(items: Any, **kw: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **kw}


def enum(*values: Any) -> dict[str, Any]:
    return {"enum": list(values)}


def s(**kw: Any) -> dict[str, Any]:
    return {"type": "string", **kw}


def i(**kw: Any) -> dict[str, Any]:
    return {"type": "integer", **kw}


def n(**kw: Any) -> dict[str, Any]:
    return {"type": "number", **kw}


UUID_UNANCHORED = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
MONEY = obj(["amount", "currency"], amount=i(minimum=0), currency=s(pattern="^[A-Z]{3}$"))
ADDRESS = obj(
    ["line1", "city", "country"],
    line1=s(maxLength=80),
    line2={"type": ["string", "null"]},
    city=s(maxLength=40),
    postal_code=s(pattern="^[0-9A-Z -]{3,10}$"),
    country=s(pattern="^[A-Z]{2}$"),
)
GEO = obj(["lat", "lon"], lat=n(minimum=-90, maximum=90), lon=n(minimum=-180, maximum=180))

BASES: dict[str, dict[str, Any]] = {
    # -- public API payloads ----------------------------------------------------------------------------------------
    "github_issue": obj(
        ["title"],
        title=s(maxLength=256),
        body=s(),
        labels=arr(S),
        assignees=arr(s(maxLength=39)),
        milestone={"type": ["integer", "null"]},
        state=enum("open", "closed"),
    ),
    "github_issue_search": obj(
        ["q"],
        q=S,
        sort=enum("comments", "reactions", "created", "updated"),
        order=s(pattern="^(asc|desc)$"),
        per_page=i(minimum=1, maximum=100),
        page=i(minimum=1),
    ),
    "payment_intent": obj(
        ["amount", "currency"],
        amount=i(minimum=50),
        currency=s(pattern="^[a-z]{3}$"),
        customer=s(pattern="^cus_[A-Za-z0-9]{8,24}$"),
        capture_method=enum("automatic", "manual"),
        metadata={"type": "object", "additionalProperties": s(maxLength=100)},
    ),
    "slack_message": obj(
        ["channel", "text"],
        channel=s(pattern="^[CDG][A-Z0-9]{8,10}$"),
        text=s(maxLength=4000),
        thread_ts=s(pattern="^[0-9]+\\.[0-9]+$"),
        unfurl_links=B,
        blocks=arr(
            obj(
                ["type"],
                type=enum("section", "divider", "header"),
                text=obj(["type", "text"], type=enum("mrkdwn", "plain_text"), text=S),
            )
        ),
    ),
    "weather_current": obj(["location"], location=S, units=enum("metric", "imperial"), lang=s(pattern="^[a-z]{2}$")),
    "weather_report": obj(
        ["temp_c", "conditions"],
        temp_c=n(minimum=-90, maximum=60),
        humidity=i(minimum=0, maximum=100),
        conditions=enum("clear", "clouds", "rain", "snow", "fog"),
        wind=obj(speed_ms=n(minimum=0), direction_deg=i(minimum=0, maximum=359)),
    ),
    "geocode_result": obj(
        ["formatted_address", "location"], formatted_address=S, location=GEO, place_id=S, types=arr(S, minItems=1)
    ),
    "calendar_event": obj(
        ["summary", "start", "end"],
        summary=s(maxLength=200),
        description=S,
        start=obj(["dateTime"], dateTime=s(format="date-time"), timeZone=S),
        end=obj(["dateTime"], dateTime=s(format="date-time"), timeZone=S),
        attendees=arr(obj(["email"], email=s(format="email"), optional=B)),
        recurrence=arr(s(pattern="^RRULE:")),
    ),
    "send_email": obj(
        ["to", "subject"],
        to=arr(s(format="email"), minItems=1, maxItems=10),
        cc=arr(s(format="email")),
        subject=s(maxLength=150),
        body=s(maxLength=2000),
        html=B,
    ),
    "file_upload": obj(["file"], file=s(format="binary"), filename=S, purpose=enum("assistants", "fine-tune", "batch")),
    "user_profile": obj(
        ["id", "username"],
        id=s(format="uuid"),
        username=s(pattern="^[a-zA-Z0-9_]{3,20}$"),
        display_name=s(maxLength=50),
        email=s(format="email"),
        created_at=s(format="date-time"),
        roles=arr(enum("admin", "editor", "viewer"), uniqueItems=True),
    ),
    "product": obj(
        ["sku", "name", "price"],
        sku=s(pattern="^[A-Z]{3}-[0-9]{4}$"),
        name=s(maxLength=120),
        price=MONEY,
        stock=i(minimum=0),
        tags=arr(S, maxItems=10),
        dimensions=obj(width_cm=n(exclusiveMinimum=0), height_cm=n(exclusiveMinimum=0)),
    ),
    "order": obj(
        ["order_id", "items", "shipping_address"],
        order_id=s(pattern=UUID_UNANCHORED),
        items=arr(obj(["sku", "quantity"], sku=S, quantity=i(minimum=1, maximum=99)), minItems=1),
        shipping_address=ADDRESS,
        status=enum("pending", "paid", "shipped", "delivered", "cancelled"),
    ),
    "invoice": obj(
        ["number", "lines", "total"],
        number=s(pattern="^INV-[0-9]{6}$"),
        issued=s(format="date"),
        due=s(format="date"),
        lines=arr(obj(["description", "amount"], description=S, amount=MONEY)),
        total=MONEY,
        paid=B,
    ),
    "shipment_tracking": obj(
        ["tracking_number", "events"],
        tracking_number=s(pattern="1Z[0-9A-Z]{16}"),
        carrier=enum("ups", "fedex", "dhl", "usps"),
        events=arr(obj(["time", "status"], time=s(format="date-time"), status=S, location=S)),
    ),
    "flight_search": obj(
        ["origin", "destination", "date"],
        origin=s(pattern="^[A-Z]{3}$"),
        destination=s(pattern="^[A-Z]{3}$"),
        date=s(format="date"),
        return_date=s(format="date"),
        passengers=i(minimum=1, maximum=9),
        cabin=enum("economy", "premium", "business", "first"),
    ),
    "hotel_booking": obj(
        ["hotel_id", "check_in", "nights", "guests"],
        hotel_id=INT,
        check_in=s(format="date"),
        nights=i(minimum=1, maximum=30),
        guests=arr(obj(["name"], name=S, age=i(minimum=0)), minItems=1, maxItems=4),
        breakfast=B,
    ),
    "oauth_token": obj(
        ["access_token", "token_type", "expires_in"],
        access_token=S,
        token_type=enum("Bearer"),
        expires_in=i(minimum=0),
        refresh_token=S,
        scope=S,
    ),
    "jwt_claims": obj(
        ["sub", "iat", "exp"],
        iss=s(format="uri"),
        sub=S,
        aud={"type": ["string", "array"], "items": S},
        iat=INT,
        exp=INT,
        nbf=INT,
        jti=s(pattern=UUID_UNANCHORED),
    ),
    "webhook_event": obj(
        ["id", "type", "data"],
        id=S,
        type=s(pattern="^[a-z]+\\.[a-z_]+$"),
        created=INT,
        data=obj(["object"], object={"type": "object"}),
        livemode=B,
    ),
    "error_response": obj(
        ["error"],
        error=obj(
            ["message", "type"],
            message=S,
            type=S,
            param={"type": ["string", "null"]},
            code={"type": ["string", "integer", "null"]},
        ),
    ),
    "geojson_feature": obj(
        ["type", "geometry", "properties"],
        type={"const": "Feature"},
        geometry=obj(["type", "coordinates"], type={"const": "Point"}, coordinates=arr(N, minItems=2, maxItems=3)),
        properties={"type": ["object", "null"]},
    ),
    "stock_quote": obj(
        ["symbol", "price"],
        symbol=s(pattern="^[A-Z]{1,5}$"),
        price=n(minimum=0),
        change_pct=N,
        volume=i(minimum=0),
        currency=s(pattern="^[A-Z]{3}$"),
    ),
    "bank_transfer": obj(
        ["iban", "amount"],
        iban=s(pattern="^[A-Z]{2}[0-9]{2}[A-Z0-9]{11,30}$"),
        amount=MONEY,
        reference=s(maxLength=140),
        execution_date=s(format="date"),
    ),
    "contact_card": obj(
        ["name"],
        name=S,
        phone=s(pattern="^\\+[1-9][0-9]{7,14}$"),
        email=s(format="email"),
        address=ADDRESS,
        birthday=s(format="date"),
    ),
    # -- tool (function) definitions ----------------------------------------------------------------------------
    "tool_web_search": obj(
        ["query"], query=S, num_results=i(minimum=1, maximum=20), site=S, recency_days={"type": ["integer", "null"]}
    ),
    "tool_read_file": obj(
        ["path"], path=S, start_line=i(minimum=1), end_line=i(minimum=1), encoding=enum("utf-8", "latin-1")
    ),
    "tool_write_file": obj(["path", "content"], path=S, content=S, mode=enum("overwrite", "append"), create_dirs=B),
    "tool_shell": obj(
        ["command"],
        command=S,
        timeout_s=n(minimum=0, maximum=600),
        cwd=S,
        env={"type": "object", "additionalProperties": S},
    ),
    "tool_sql_query": obj(
        ["sql"],
        sql=s(pattern="^(SELECT|WITH) "),
        params=arr({"type": ["string", "number", "boolean", "null"]}),
        max_rows=i(minimum=1, maximum=1000),
    ),
    "tool_git_commit": obj(["message"], message=s(maxLength=72), files=arr(S), amend=B, sign_off=B),
    "tool_create_ticket": obj(
        ["project", "summary", "issue_type"],
        project=s(pattern="^[A-Z][A-Z0-9]{1,9}$"),
        summary=s(maxLength=255),
        issue_type=enum("Bug", "Task", "Story", "Epic"),
        priority=enum("Lowest", "Low", "Medium", "High", "Highest"),
        labels=arr(S),
        story_points={"type": ["number", "null"]},
    ),
    "tool_translate": obj(
        ["text", "target"],
        text=s(maxLength=5000),
        source=s(pattern="^[a-z]{2}(-[A-Z]{2})?$"),
        target=s(pattern="^[a-z]{2}(-[A-Z]{2})?$"),
        formality=enum("default", "more", "less"),
    ),
    "tool_generate_image": obj(
        ["prompt"],
        prompt=s(maxLength=1000),
        size=enum("256x256", "512x512", "1024x1024"),
        n=i(minimum=1, maximum=4),
        style=enum("vivid", "natural"),
    ),
    "tool_set_reminder": obj(
        ["text", "at"],
        text=S,
        at=s(format="date-time"),
        repeat={"anyOf": [{"type": "null"}, enum("daily", "weekly", "monthly")]},
    ),
    "tool_get_tags": obj(["scope"], scope=s(pattern="^all|tags$"), limit=i(minimum=1)),
    "tool_lookup_order": obj(
        ["order_id"], order_id=s(pattern=UUID_UNANCHORED), include=arr(enum("items", "payments", "shipments"))
    ),
    "tool_summarize": obj(["text"], text=s(maxLength=20000), max_words=i(minimum=10, maximum=500), bullet_points=B),
    "tool_classify": obj(
        ["label", "confidence"],
        label=enum("positive", "negative", "neutral"),
        confidence=n(minimum=0, maximum=1),
        rationale=s(maxLength=300),
    ),
    "tool_extract_entities": obj(
        ["entities"],
        entities=arr(
            obj(
                ["text", "type"],
                text=S,
                type=enum("PERSON", "ORG", "LOC", "DATE", "MONEY"),
                start=i(minimum=0),
                end=i(minimum=0),
            )
        ),
    ),
    # -- configuration formats ---------------------------------------------------------------------------------
    "package_json": obj(
        ["name", "version"],
        name=s(pattern="^(@[a-z0-9-~][a-z0-9-._~]*/)?[a-z0-9-~][a-z0-9-._~]*$", maxLength=214),
        version=s(pattern="^[0-9]+\\.[0-9]+\\.[0-9]+(-[0-9A-Za-z.-]+)?$"),
        description=S,
        scripts={"type": "object", "additionalProperties": S},
        private=B,
        dependencies={"type": "object", "additionalProperties": S},
        license=S,
    ),
    "tsconfig": obj(
        compilerOptions=obj(
            target=enum("es5", "es2015", "es2020", "esnext"),
            strict=B,
            module=enum("commonjs", "esnext", "nodenext"),
            outDir=S,
            paths={"type": "object", "additionalProperties": arr(S)},
        ),
        include=arr(S),
        exclude=arr(S),
    ),
    "docker_compose_service": obj(
        ["image"],
        image=S,
        ports=arr(s(pattern="^[0-9]+(:[0-9]+)?$")),
        environment={"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
        restart=enum("no", "always", "on-failure", "unless-stopped"),
        depends_on=arr(S),
    ),
    "k8s_container": obj(
        ["name", "image"],
        name=s(pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", maxLength=63),
        image=S,
        args=arr(S),
        resources=obj(limits=obj(cpu=S, memory=s(pattern="^[0-9]+(Mi|Gi)$")), requests=obj(cpu=S, memory=S)),
        ports=arr(obj(["containerPort"], containerPort=i(minimum=1, maximum=65535), protocol=enum("TCP", "UDP"))),
    ),
    "github_actions_step": obj(
        name=S,
        uses=s(pattern="^[^@]+@[^@]+$"),
        run=S,
        env={"type": "object", "additionalProperties": S},
        **{"with": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}}},
    ),
    "logging_config": obj(
        ["version"],
        version={"const": 1},
        disable_existing_loggers=B,
        root=obj(["level"], level=enum("DEBUG", "INFO", "WARNING", "ERROR"), handlers=arr(S)),
        handlers={"type": "object", "additionalProperties": obj(["class"], **{"class": S}, level=S, formatter=S)},
    ),
    "feature_flags": obj(
        ["flags"],
        flags=arr(
            obj(
                ["key", "enabled"],
                key=s(pattern="^[a-z][a-z0-9_]*$"),
                enabled=B,
                rollout_pct=i(minimum=0, maximum=100),
                variants=arr(S),
            )
        ),
    ),
    "cron_job": obj(
        ["schedule", "command"],
        schedule=s(pattern="^(\\S+ ){4}\\S+$"),
        command=S,
        timezone=S,
        enabled=B,
        retries=i(minimum=0, maximum=5),
    ),
    "eslint_rules": obj(
        rules={
            "type": "object",
            "additionalProperties": {
                "anyOf": [
                    enum("off", "warn", "error", 0, 1, 2),
                    arr({"type": ["string", "number", "object"]}, minItems=1),
                ]
            },
        },
        extends=arr(S),
        root=B,
    ),
    "org_chart": {
        "$defs": {
            "node": obj(
                ["name", "title"],
                name=S,
                title=S,
                reports={"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3},
            )
        },
        "$ref": "#/$defs/node",
    },
}

# OpenAPI's formats for the variant below: annotations that validators do not check by default.
OPENAPI_FORMATS = {
    "string": ["byte", "binary", "password", "uri", "hostname"],
    "integer": ["int32", "int64"],
    "number": ["float", "double"],
}


def _walk(node: Any, fn: Any) -> None:
    if isinstance(node, dict):
        fn(node)
        for v in node.values():
            _walk(v, fn)
    elif isinstance(node, list):
        for v in node:
            _walk(v, fn)


def openapi_flavoured(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI style: every typed leaf without a format gets one of OpenAPI's (`binary`, `int64`, `double`, ...)."""
    out = copy.deepcopy(schema)
    count = [0]

    def add(node: dict[str, Any]) -> None:
        kind = node.get("type")
        if isinstance(kind, str) and kind in OPENAPI_FORMATS and "format" not in node and "pattern" not in node:
            fmts = OPENAPI_FORMATS[kind]
            node["format"] = fmts[count[0] % len(fmts)]
            count[0] += 1

    _walk(out, add)
    return out


def strict_tool(schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAI strict function style: every object closed (`additionalProperties: false`) with all properties
    required."""
    out = copy.deepcopy(schema)

    def close(node: dict[str, Any]) -> None:
        if node.get("type") == "object" and "properties" in node:
            node["additionalProperties"] = False
            node["required"] = sorted(node["properties"])

    _walk(out, close)
    return out


def paginated(schema: dict[str, Any]) -> dict[str, Any]:
    """A list endpoint's envelope around the payload."""
    defs = schema.get("$defs")
    inner = {k: v for k, v in schema.items() if k != "$defs"}
    out = obj(
        ["data", "has_more"],
        object={"const": "list"},
        data=arr(inner, maxItems=3),
        has_more=B,
        next_cursor={"type": ["string", "null"]},
    )
    if defs:
        out["$defs"] = defs
    return out


def annotated(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    """The payload under `$defs`, referenced from the root, with title/description/examples annotations."""
    defs = dict(schema.get("$defs", {}))
    defs[name] = {k: v for k, v in schema.items() if k != "$defs"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": name.replace("_", " ").title(),
        "description": f"The {name} payload.",
        "examples": [],
        "$defs": defs,
        "$ref": f"#/$defs/{name}",
    }


def suite() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, schema in BASES.items():
        out += [
            (name, schema),
            (name + "/openapi", openapi_flavoured(schema)),
            (name + "/strict", strict_tool(schema)),
            (name + "/list", paginated(schema)),
            (name + "/defs", annotated(name, schema)),
        ]
    return out
