//! The OpenAPI 3.1 document of the HTTP edge, served at `/openapi.json`.

use serde_json::{Value, json};

pub fn document() -> Value {
    let signed = json!([
        {"name": "X-Fedrelay-Domain", "in": "header", "required": true, "schema": {"type": "string"},
         "description": "The calling domain, as declared in the relay's config."},
        {"name": "X-Fedrelay-Timestamp", "in": "header", "required": true, "schema": {"type": "string", "pattern": "^[0-9]+$"},
         "description": "Unix time in seconds; must be within 5 minutes of the relay's clock."},
        {"name": "X-Fedrelay-Signature", "in": "header", "required": true, "schema": {"type": "string", "pattern": "^v1=[0-9a-f]{64}$"},
         "description": "v1= + hex HMAC-SHA256 with the domain's secret over `<timestamp>.<body>` (POST) or `<timestamp>.GET /v1/stream`."}
    ]);
    let error = json!({"$ref": "#/components/schemas/Error"});
    let err =
        |d: &str| json!({"description": d, "content": {"application/json": {"schema": error}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "fedrelay HTTP edge",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Signed JSON events between a domain's own system and the fedrelay federation relay."
        },
        "paths": {
            "/v1/events": {
                "post": {
                    "summary": "Send one event",
                    "operationId": "postEvent",
                    "parameters": signed,
                    "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InboundEvent"}}}},
                    "responses": {
                        "202": {"description": "Journaled; the relay will deliver it.",
                                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}}},
                        "400": err("Malformed or invalid event."),
                        "401": err("Unknown domain, missing, bad or stale signature."),
                        "403": err("No federation rule connects the two domains, or an edit or delete of another sender's message."),
                        "413": err("Body over the size limit."),
                        "415": err("Content-Type is not application/json."),
                        "422": err("The event names a target message unknown in this conversation."),
                        "503": err("The journal could not be written; retry after the Retry-After delay.")
                    }
                }
            },
            "/v1/stream": {
                "get": {
                    "summary": "Receive events as Server-Sent Events",
                    "operationId": "streamEvents",
                    "parameters": [
                        signed[0], signed[1], signed[2],
                        {"name": "Last-Event-ID", "in": "header", "required": false, "schema": {"type": "string"},
                         "description": "Resume after this event id."},
                        {"name": "after", "in": "query", "required": false, "schema": {"type": "string"},
                         "description": "Resume after this event id (for clients that cannot set headers); `$` for only new events."}
                    ],
                    "responses": {
                        "200": {"description": "An endless event stream; each `data:` is an OutboundEvent.",
                                "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                        "400": err("Malformed resume id."),
                        "401": err("Unknown domain, missing, bad or stale signature."),
                        "409": err("The domain receives events by webhook.")
                    }
                }
            }
        },
        "components": {
            "schemas": {
                "Run": {"type": "object", "required": ["text"], "additionalProperties": false, "properties": {
                    "text": {"type": "string"}, "bold": {"type": "boolean"}, "italic": {"type": "boolean"},
                    "strike": {"type": "boolean"}, "code": {"type": "boolean"}, "link": {"type": "string"}}},
                "Target": {"type": "object", "additionalProperties": false, "properties": {
                    "event_id": {"type": "string"}, "relay_msg_id": {"type": "string"}}},
                "File": {"type": "object", "required": ["name", "size", "mime", "url"], "additionalProperties": false, "properties": {
                    "name": {"type": "string"}, "size": {"type": "integer", "minimum": 0}, "mime": {"type": "string"},
                    "url": {"type": "string", "format": "uri"}}},
                "InboundEvent": {"type": "object", "required": ["id", "type", "from", "to"], "additionalProperties": false, "properties": {
                    "id": {"type": "string", "minLength": 1, "maxLength": 256},
                    "type": {"type": "string", "enum": ["message", "edit", "delete", "reaction", "typing", "presence", "contact_request", "contact_response", "file", "profile", "profile_query"]},
                    "from": {"type": "string"}, "to": {"type": "string", "description": "user@domain, or #key@domain for a channel the sender was invited to"},
                    "sent_at": {"type": "integer", "description": "ms since the Unix epoch"},
                    "text": {"type": "string"}, "rich": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
                    "target": {"$ref": "#/components/schemas/Target"},
                    "emoji": {"type": "string"}, "added": {"type": "boolean"}, "active": {"type": "boolean"},
                    "availability": {"type": "string", "enum": ["available", "away", "busy", "do_not_disturb", "offline"]},
                    "note": {"type": "string"}, "accepted": {"type": "boolean"},
                    "file": {"$ref": "#/components/schemas/File"},
                    "profile": {"$ref": "#/components/schemas/Profile"}}},
                "Profile": {"type": "object", "required": ["display_name"], "additionalProperties": false, "properties": {
                    "display_name": {"type": "string"}, "email": {"type": "string"}, "title": {"type": "string"},
                    "organisation": {"type": "string"}, "avatar_url": {"type": "string", "format": "uri"}}},
                "OutboundEvent": {"type": "object", "required": ["session_id", "seq", "relay_msg_id", "type", "from", "from_platform", "to", "sent_at"], "properties": {
                    "session_id": {"type": "string"}, "seq": {"type": "integer"}, "relay_msg_id": {"type": "string"},
                    "type": {"type": "string"}, "from": {"type": "string"}, "from_platform": {"type": "string"},
                    "to": {"type": "string"}, "sent_at": {"type": "integer"}}},
                "WebhookBatch": {"type": "object", "required": ["events"], "properties": {
                    "events": {"type": "array", "items": {"$ref": "#/components/schemas/OutboundEvent"}}}},
                "Accepted": {"type": "object", "required": ["relay_msg_id", "session_id", "seq", "duplicate"], "properties": {
                    "relay_msg_id": {"type": "string"}, "session_id": {"type": "string"},
                    "seq": {"type": "integer"}, "duplicate": {"type": "boolean"}}},
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string"}, "message": {"type": "string"}}}
            }
        }
    })
}
