//! W3C trace context carried in envelopes, so one trace follows a message across nodes.

use fedrelay_proto::v1::TraceContext;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use std::collections::HashMap;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

struct Carried<'a>(&'a TraceContext);

impl Extractor for Carried<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.0.traceparent.as_str()),
            "tracestate" if !self.0.tracestate.is_empty() => Some(self.0.tracestate.as_str()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

/// Makes `span` a child of the trace an envelope carries, if it carries one.
pub fn set_parent(span: &Span, tc: Option<&TraceContext>) {
    if let Some(tc) = tc.filter(|t| !t.traceparent.is_empty()) {
        let cx = TraceContextPropagator::new().extract(&Carried(tc));
        let _ = span.set_parent(cx);
    }
}

struct MapInjector(HashMap<String, String>);

impl Injector for MapInjector {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
}

/// The current span's trace context, to carry in an envelope (`None` when not tracing).
pub fn current() -> Option<TraceContext> {
    let cx = Span::current().context();
    let mut inj = MapInjector(HashMap::new());
    TraceContextPropagator::new().inject_context(&cx, &mut inj);
    let traceparent = inj.0.remove("traceparent")?;
    Some(TraceContext {
        traceparent,
        tracestate: inj.0.remove("tracestate").unwrap_or_default(),
    })
}
