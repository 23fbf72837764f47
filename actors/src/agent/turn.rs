//! Running one turn: slots, circuit, attempts, retries, and the events that
//! say how it ended (the rules are in the parent module's doc).

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures::FutureExt;
use switchboard_events::catalog::{ReplyCompleted, ReplyFailed, UsageRecorded};
use switchboard_events::Event;
use tokio::sync::mpsc;
use tokio::time::Instant;
use uuid::Uuid;

use super::circuit::{CallPermit, CircuitOpen, CircuitTransition};
use super::retry::retry_delay;
use super::{Agent, CircuitAlert, TurnOutcome, TurnRequest};
use crate::provider::{
    estimate_usage_blocking, trim_to_tokens_blocking, ChatMessage, Completion, CompletionRequest,
    ProviderError, Usage,
};

/// Deltas buffered between the provider and the caller's channel.
const DELTA_BUFFER: usize = 64;

/// Keeps the newest whole exchanges of `history` (earlier user and assistant
/// messages in pairs, then the message answered) within `max` earlier messages.
fn trim_context(history: &mut Vec<ChatMessage>, max: usize) {
    let earlier = history.len().saturating_sub(1);
    let keep = earlier.min(max - max % 2);
    history.drain(..earlier - keep);
}

/// One provider call and what it streamed before it ended.
struct Attempt {
    result: Result<Completion, ProviderError>,
    streamed: String,
}

impl Agent {
    /// Run one turn to its end. Always returns an outcome: a panic inside the
    /// provider becomes `reply_failed` with code `internal`.
    pub async fn run_turn(&self, request: TurnRequest) -> TurnOutcome {
        let ids = request.ids_only();
        // The model call, with the attributes of OpenTelemetry's GenAI
        // semantic conventions.
        let model = self.provider.model();
        let span = tracing::debug_span!(
            "chat",
            otel.name = %format_args!("chat {model}"),
            otel.kind = "client",
            gen_ai.operation.name = "chat",
            gen_ai.provider.name = self.provider.kind(),
            gen_ai.request.model = model,
            gen_ai.response.model = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            agent = %self.config.name,
            conversation_id = %request.conversation_id,
            message_id = %request.message_id,
            key_id = %request.key_id,
        );
        crate::trace::continue_trace(&span, request.traceparent.as_deref());
        let turn = AssertUnwindSafe(self.turn(request)).catch_unwind();
        let outcome = match tracing::Instrument::instrument(turn, span.clone()).await {
            Ok(outcome) => outcome,
            Err(_) => {
                tracing::error!(agent = %self.config.name, message_id = %ids.message_id, "turn panicked");
                TurnOutcome::failure(&ids, &self.config.name, "internal", "the agent failed")
            }
        };
        if let Some(usage) = outcome.usage() {
            span.record("gen_ai.response.model", usage.model.as_str());
            span.record("gen_ai.usage.input_tokens", usage.prompt_tokens);
            span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
        }
        outcome
    }

    async fn turn(&self, mut request: TurnRequest) -> TurnOutcome {
        let started = Instant::now();
        trim_context(&mut request.history, self.config.context_messages);
        if let Some(max_tokens) = self.config.context_tokens {
            let model = self.provider.model().to_owned();
            request.history = trim_to_tokens_blocking(model, request.history, max_tokens).await;
        }
        let mut retries = 0;
        let mut last_error: Option<ProviderError> = None;
        loop {
            // Fail fast on an open circuit rather than queue for a slot first.
            if self.breaker().would_refuse(Instant::now()) {
                return self.circuit_refused(&request, None, last_error.as_ref());
            }
            let slot = self
                .slots
                .acquire()
                .await
                .expect("an agent never closes its semaphore");
            let call = match self.admit() {
                Ok(call) => call,
                Err(open) => {
                    return self.circuit_refused(&request, Some(open), last_error.as_ref())
                }
            };
            let attempt = self.attempt(&request).await;
            drop(slot);

            let error = match attempt.result {
                Ok(completion) => {
                    call.finish(true);
                    metrics::histogram!("switchboard_agent_latency_seconds", "agent" => self.config.name.clone())
                        .record(started.elapsed().as_secs_f64());
                    return self.completed(request, completion, started.elapsed()).await;
                }
                Err(error) => error,
            };
            metrics::counter!(
                "switchboard_upstream_errors_total",
                "agent" => self.config.name.clone(),
                "status" => error.status_label(),
            )
            .increment(1);
            // Only transient errors say the server is unwell; a rejected
            // request or a protocol error means it answered.
            call.finish_with_cause(!error.is_transient(), &error);

            if !attempt.streamed.is_empty() {
                return self
                    .failed_after_streaming(request, error, attempt.streamed)
                    .await;
            }
            if !error.is_transient() || retries >= self.config.max_retries {
                return self.failed(&request, &error);
            }
            let Some(wait) = retry_delay(
                &error,
                retries,
                self.config.backoff_base,
                self.config.backoff_max,
                jitter(),
            ) else {
                return self.failed(&request, &error);
            };
            tracing::debug!(
                agent = %self.config.name,
                message_id = %request.message_id,
                error = %error,
                wait_ms = wait.as_millis() as u64,
                "retrying",
            );
            tokio::time::sleep(wait).await;
            retries += 1;
            last_error = Some(error);
        }
    }

    /// Take the circuit's permission for one call.
    fn admit(&self) -> Result<CallGuard<'_>, CircuitOpen> {
        let (permit, transition) = self.breaker().admit(Instant::now())?;
        self.alert(transition, None);
        Ok(CallGuard {
            agent: self,
            permit: Some(permit),
        })
    }

    /// One provider call, bounded by the timeout, relaying its deltas to the
    /// caller and keeping a copy of what was streamed.
    async fn attempt(&self, request: &TurnRequest) -> Attempt {
        let (deltas, mut received) = mpsc::channel::<String>(DELTA_BUFFER);
        let timeout = self.config.timeout;
        let call = CompletionRequest::new(request.history.clone(), timeout);
        let call = async {
            // The provider honours the timeout itself; this bounds one that does not.
            tokio::time::timeout(timeout, self.provider.complete(call, deltas))
                .await
                .unwrap_or(Err(ProviderError::Timeout))
        };
        let attempt_started = Instant::now();
        let relay = async {
            let mut streamed = String::new();
            while let Some(delta) = received.recv().await {
                if streamed.is_empty() {
                    metrics::histogram!("switchboard_agent_ttft_seconds", "agent" => self.config.name.clone())
                        .record(attempt_started.elapsed().as_secs_f64());
                }
                streamed.push_str(&delta);
                if let Some(caller) = &request.deltas {
                    // A caller that stopped listening does not stop the turn.
                    let _ = caller.send(delta).await;
                }
            }
            streamed
        };
        let (result, streamed) = tokio::join!(call, relay);
        Attempt { result, streamed }
    }

    async fn completed(
        &self,
        request: TurnRequest,
        completion: Completion,
        latency: Duration,
    ) -> TurnOutcome {
        let Completion {
            content,
            finish_reason,
            model,
            usage,
            estimated,
        } = completion;
        let (usage, estimated) = match usage {
            Some(usage) => (usage, estimated),
            None => {
                let counted = estimate_usage_blocking(
                    model.clone(),
                    request.history.clone(),
                    content.clone(),
                )
                .await;
                (counted, true)
            }
        };
        let reply = request.event(
            Event::ReplyCompleted(ReplyCompleted {
                conversation_id: request.conversation_id.clone(),
                message_id: request.message_id.clone(),
                reply_id: request.reply_id.clone(),
                agent: self.config.name.clone(),
                content,
                finish_reason,
                latency_ms: u64::try_from(latency.as_millis()).unwrap_or(u64::MAX),
            }),
            request.causation_id,
        );
        let usage = self.usage_event(&request, reply.id, model, usage, estimated);
        TurnOutcome {
            events: vec![reply, usage],
        }
    }

    /// A turn that failed after streaming part of its reply: `reply_failed`,
    /// then the charge for what was streamed.
    async fn failed_after_streaming(
        &self,
        request: TurnRequest,
        error: ProviderError,
        streamed: String,
    ) -> TurnOutcome {
        tracing::warn!(
            agent = %self.config.name,
            message_id = %request.message_id,
            error = %error,
            streamed_bytes = streamed.len(),
            "turn failed mid-reply",
        );
        let model = self.provider.model().to_owned();
        let (usage, estimated) = match &error {
            ProviderError::Interrupted {
                usage: Some(usage), ..
            } => (*usage, false),
            _ => {
                let counted =
                    estimate_usage_blocking(model.clone(), request.history.clone(), streamed).await;
                (counted, true)
            }
        };
        let mut outcome = self.failure(&request, error.code(), &error.to_string());
        let reply_id = outcome.events[0].id;
        let usage = self.usage_event(&request, reply_id, model, usage, estimated);
        outcome.events.push(usage);
        outcome
    }

    fn failed(&self, request: &TurnRequest, error: &ProviderError) -> TurnOutcome {
        tracing::warn!(
            agent = %self.config.name,
            message_id = %request.message_id,
            error = %error,
            "turn failed",
        );
        self.failure(request, error.code(), &error.to_string())
    }

    fn circuit_refused(
        &self,
        request: &TurnRequest,
        open: Option<CircuitOpen>,
        last_error: Option<&ProviderError>,
    ) -> TurnOutcome {
        let mut message = format!(
            "agent {} is unavailable: its circuit is open",
            self.config.name
        );
        if let Some(retry_in) = open.and_then(|open| open.retry_in) {
            message.push_str(&format!(" for {} ms more", retry_in.as_millis()));
        }
        if let Some(error) = last_error {
            message.push_str(&format!("; last error: {error}"));
        }
        tracing::debug!(agent = %self.config.name, message_id = %request.message_id, "{message}");
        self.failure(request, "unavailable", &message)
    }

    fn failure(&self, request: &TurnRequest, code: &str, message: &str) -> TurnOutcome {
        let failed = Event::ReplyFailed(ReplyFailed {
            conversation_id: request.conversation_id.clone(),
            message_id: request.message_id.clone(),
            agent: self.config.name.clone(),
            code: code.to_owned(),
            message: message.to_owned(),
        });
        TurnOutcome {
            events: vec![request.event(failed, request.causation_id)],
        }
    }

    fn usage_event(
        &self,
        request: &TurnRequest,
        reply_event: Uuid,
        model: String,
        usage: Usage,
        estimated: bool,
    ) -> switchboard_events::NewEvent {
        let price = self.config.prices;
        request.event(
            Event::UsageRecorded(UsageRecorded {
                conversation_id: request.conversation_id.clone(),
                message_id: request.message_id.clone(),
                key_id: request.key_id.clone(),
                user: request.user.clone(),
                agent: self.config.name.clone(),
                model,
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                estimated,
                input_price: price.input_micros_per_mtok,
                output_price: price.output_micros_per_mtok,
                cost_micros: price.cost_micros(usage),
            }),
            Some(reply_event),
        )
    }

    fn alert(&self, transition: Option<CircuitTransition>, cause: Option<&ProviderError>) {
        let Some(transition) = transition else {
            return;
        };
        let cause = cause.map(ToString::to_string);
        metrics::gauge!("switchboard_circuit_state", "agent" => self.config.name.clone())
            .set(transition.state_after().gauge());
        tracing::warn!(
            agent = %self.config.name,
            state = transition.state_after().as_str(),
            ?transition,
            cause = cause.as_deref().unwrap_or(""),
            "agent circuit changed",
        );
        if let Some(alerts) = &self.alerts {
            // Nobody listening any more is not the turn's problem.
            let _ = alerts.send(CircuitAlert {
                agent: self.config.name.clone(),
                transition,
                cause,
            });
        }
    }
}

/// The circuit's permission for one call, which must report how the call
/// went. Dropped unreported (the call panicked), it counts as a failure, so a
/// half-open circuit never waits forever for its trial.
struct CallGuard<'a> {
    agent: &'a Agent,
    permit: Option<CallPermit>,
}

impl CallGuard<'_> {
    fn finish(mut self, healthy: bool) {
        self.report(healthy, None);
    }

    fn finish_with_cause(mut self, healthy: bool, cause: &ProviderError) {
        self.report(healthy, Some(cause));
    }

    fn report(&mut self, healthy: bool, cause: Option<&ProviderError>) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let now = Instant::now();
        let transition = {
            let mut breaker = self.agent.breaker();
            if healthy {
                breaker.succeeded(permit, now)
            } else {
                breaker.failed(permit, now)
            }
        };
        self.agent.alert(transition, cause);
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.report(false, None);
    }
}

/// A random number for the backoff's jitter (v4 UUIDs come from the OS's
/// random source; no extra dependency for a few bits).
fn jitter() -> u64 {
    Uuid::new_v4().as_u64_pair().0
}
