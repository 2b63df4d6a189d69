//! Google's Gemini API: `POST {base_url}/models/{model}:generateContent` (for example
//! `https://generativelanguage.googleapis.com/v1beta`), streamed at
//! `:streamGenerateContent?alt=sse`, authenticated with `x-goog-api-key`.
//!
//! System messages become `systemInstruction`; user turns role `user`, assistant turns role
//! `model` with `text` and `functionCall {name, args}` parts; tool results are `user` turns
//! with `functionResponse {name, response}` parts (the API knows only the roles `user` and
//! `model`). A function response needs the function's name, which the router's tool message
//! lacks: it is taken from the latest earlier assistant call with the same id. A tool result
//! whose call cannot be found (or that has no id) is sent as user text. `response` must be an
//! object: a result that is a JSON object is sent as it is, anything else as
//! `{"result": text}`. Consecutive turns of one side are joined, so the results of parallel
//! calls form one turn.
//!
//! Gemini gives function calls no id (newer models may; theirs is kept): answers number them
//! `call_0`, `call_1`, ... in order. Token counts are `usageMetadata`'s, cumulative in a
//! stream (the last one counts).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::anthropic::arguments_object;
use super::sse::{self, Decoder, SseEvent};
use super::upstream::{ErrorBody, Redactor, Upstream};
use super::{
    ChatMessage, ChatRequest, ChatResponse, ChatStream, Provider, Role, StreamEvent, TokenUsage,
    ToolCall, ToolChoice,
};
use crate::config::DeploymentConfig;
use crate::error::ProviderError;

#[derive(Debug)]
pub struct Gemini {
    complete: Upstream,
    stream: Upstream,
}

impl Gemini {
    pub fn new(config: &DeploymentConfig) -> anyhow::Result<Self> {
        // The API's own resource names read `models/{model}`; either spelling is accepted.
        let model = config
            .model
            .strip_prefix("models/")
            .unwrap_or(&config.model);
        let complete = Upstream::new(config, &format!("/models/{model}:generateContent"))?;
        let stream = complete.with_path(&format!("/models/{model}:streamGenerateContent?alt=sse"));
        Ok(Self { complete, stream })
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    contents: Vec<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<Value>,
}

#[derive(Debug, PartialEq, Serialize)]
struct Content {
    role: &'static str,
    parts: Vec<Value>,
}

/// The number as the user wrote it: an `f32` widened directly would send 0.9 as
/// 0.8999999761581421.
fn decimal(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

fn body(request: &ChatRequest) -> Body {
    let system: Vec<&str> = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let mut config = serde_json::Map::new();
    if let Some(max_tokens) = request.max_tokens {
        config.insert("maxOutputTokens".into(), max_tokens.into());
    }
    if let Some(temperature) = request.temperature {
        config.insert("temperature".into(), decimal(temperature).into());
    }
    if let Some(top_p) = request.top_p {
        config.insert("topP".into(), decimal(top_p).into());
    }
    if let Some(seed) = request.seed {
        // Gemini takes a 32-bit seed.
        config.insert("seed".into(), (seed as u32 as i64).into());
    }
    if !request.stop.is_empty() {
        config.insert("stopSequences".into(), request.stop.clone().into());
    }
    if request.json_mode {
        config.insert("responseMimeType".into(), "application/json".into());
    }
    let declarations: Vec<Value> = request
        .tools
        .iter()
        .map(|tool| {
            json!({
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            })
        })
        .collect();
    let tool_config = request
        .tool_choice
        .as_ref()
        .filter(|_| !declarations.is_empty())
        .map(|choice| {
            let calling = match choice {
                ToolChoice::Auto => json!({"mode": "AUTO"}),
                ToolChoice::None => json!({"mode": "NONE"}),
                ToolChoice::Required => json!({"mode": "ANY"}),
                ToolChoice::Tool(name) => json!({"mode": "ANY", "allowedFunctionNames": [name]}),
            };
            json!({ "functionCallingConfig": calling })
        });
    Body {
        contents: contents(&request.messages),
        system_instruction: (!system.is_empty())
            .then(|| json!({"parts": [{"text": system.join("\n\n")}]})),
        generation_config: (!config.is_empty()).then_some(Value::Object(config)),
        tools: if declarations.is_empty() {
            Vec::new()
        } else {
            vec![json!({ "functionDeclarations": declarations })]
        },
        tool_config,
    }
}

fn contents(messages: &[ChatMessage]) -> Vec<Content> {
    let mut contents: Vec<Content> = Vec::with_capacity(messages.len());
    for (position, message) in messages.iter().enumerate() {
        let (role, parts) = match message.role {
            Role::System => continue,
            Role::User => ("user", text_parts(&message.content)),
            Role::Assistant => {
                let mut parts = text_parts(&message.content);
                parts.extend(message.tool_calls.iter().map(|call| {
                    json!({"functionCall": {
                        "name": call.name,
                        "args": arguments_object(&call.arguments),
                    }})
                }));
                ("model", parts)
            }
            Role::Tool => match called_function(&messages[..position], message) {
                Some(name) => (
                    "user",
                    vec![json!({"functionResponse": {
                        "name": name,
                        "response": tool_response(&message.content),
                    }})],
                ),
                None => ("user", text_parts(&message.content)),
            },
        };
        match contents.last_mut() {
            Some(last) if last.role == role => last.parts.extend(parts),
            _ => contents.push(Content { role, parts }),
        }
    }
    contents
}

/// The name of the function `result` answers: that of the latest call with its id before it.
fn called_function<'a>(earlier: &'a [ChatMessage], result: &ChatMessage) -> Option<&'a str> {
    let id = result.tool_call_id.as_deref()?;
    earlier
        .iter()
        .rev()
        .flat_map(|m| m.tool_calls.iter().rev())
        .find(|call| call.id == id)
        .map(|call| call.name.as_str())
}

fn tool_response(content: &str) -> Value {
    match serde_json::from_str::<Value>(content) {
        Ok(value @ Value::Object(_)) => value,
        _ => json!({ "result": content }),
    }
}

/// Empty text is left out: the API rejects empty parts.
fn text_parts(text: &str) -> Vec<Value> {
    if text.is_empty() {
        Vec::new()
    } else {
        vec![json!({ "text": text })]
    }
}

/// A `generateContent` answer, or one chunk of a stream of them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    #[serde(default)]
    candidates: Vec<Candidate>,
    usage_metadata: Option<UsageMetadata>,
    prompt_feedback: Option<PromptFeedback>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    content: Option<CandidateContent>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    text: Option<String>,
    /// Set on the model's thoughts, which are not part of the answer.
    #[serde(default)]
    thought: bool,
    function_call: Option<FunctionCall>,
}

#[derive(Deserialize)]
struct FunctionCall {
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    block_reason: Option<String>,
}

/// Gemini's `finishReason` in OpenAI's `finish_reason` terms.
fn finish_reason(reason: &str) -> String {
    match reason {
        "STOP" | "FINISH_REASON_UNSPECIFIED" => "stop",
        "MAX_TOKENS" => "length",
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            "content_filter"
        }
        other => return other.to_ascii_lowercase(),
    }
    .to_owned()
}

/// The parts of one answer (or chunk) as events; `calls` counts the calls seen before.
fn part_events(parts: Vec<Part>, calls: &mut u32) -> Vec<StreamEvent> {
    let mut events = Vec::new();
    for part in parts {
        if let Some(text) = part.text.filter(|t| !t.is_empty() && !part.thought) {
            events.push(StreamEvent::Text(text));
        }
        if let Some(call) = part.function_call {
            events.push(StreamEvent::ToolCall {
                index: *calls,
                id: Some(call.id.unwrap_or_else(|| format!("call_{calls}"))),
                name: Some(call.name),
                arguments: call.args.unwrap_or_else(|| json!({})).to_string(),
            });
            *calls += 1;
        }
    }
    events
}

/// The reading of answers: a whole one, or the chunks of a stream.
#[derive(Default)]
struct Reading {
    calls: u32,
    finish_reason: Option<String>,
    usage: TokenUsage,
}

impl Reading {
    fn answer(&mut self, answer: Answer) -> Result<Vec<StreamEvent>, ProviderError> {
        if let Some(usage) = answer.usage_metadata {
            // Cumulative in a stream: the last one counts.
            self.usage = TokenUsage {
                prompt: usage.prompt_token_count,
                completion: usage.candidates_token_count,
            };
        }
        let Some(candidate) = answer.candidates.into_iter().next() else {
            // A blocked prompt gets no candidate, only the reason.
            if answer
                .prompt_feedback
                .is_some_and(|f| f.block_reason.is_some())
            {
                self.finish_reason = Some("content_filter".into());
            }
            return Ok(Vec::new());
        };
        let events = part_events(
            candidate.content.map(|c| c.parts).unwrap_or_default(),
            &mut self.calls,
        );
        if let Some(reason) = candidate.finish_reason {
            self.finish_reason = Some(finish_reason(&reason));
        }
        Ok(events)
    }

    fn done(&mut self) -> Result<StreamEvent, ProviderError> {
        let finish_reason = self.finish_reason.take().ok_or_else(|| {
            ProviderError::Malformed("the answer has no candidate with a finish reason".into())
        })?;
        Ok(StreamEvent::Done {
            // A call was made: the caller must answer it, whatever stopped the model.
            finish_reason: if self.calls > 0 && finish_reason == "stop" {
                "tool_calls".into()
            } else {
                finish_reason
            },
            usage: self.usage,
        })
    }
}

fn headers(http: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    match key {
        Some(key) => http.header("x-goog-api-key", key),
        None => http,
    }
}

#[async_trait]
impl Provider for Gemini {
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let answer = self.complete.post_json(&body(request), headers).await?;
        let answer: Answer = serde_json::from_str(&answer)
            .map_err(|e| ProviderError::Malformed(format!("not a generateContent answer: {e}")))?;
        let mut reading = Reading::default();
        let mut response = ChatResponse::default();
        let events = reading.answer(answer)?;
        for event in events.into_iter().chain([reading.done()?]) {
            match event {
                StreamEvent::Text(text) => response.content.push_str(&text),
                StreamEvent::ToolCall {
                    id,
                    name,
                    arguments,
                    ..
                } => response.tool_calls.push(ToolCall {
                    id: id.unwrap_or_default(),
                    name: name.unwrap_or_default(),
                    arguments,
                }),
                StreamEvent::Done {
                    finish_reason,
                    usage,
                } => {
                    response.finish_reason = finish_reason;
                    response.usage = usage;
                }
            }
        }
        Ok(response)
    }

    async fn stream(&self, request: &ChatRequest) -> Result<ChatStream, ProviderError> {
        let body = self.stream.post_stream(&body(request), headers).await?;
        Ok(sse::decode(
            body,
            Chunks {
                redactor: self.stream.redactor(),
                reading: Reading::default(),
            },
        ))
    }
}

/// The reading of a stream: every event is a whole answer for the text since the last; the
/// stream has no end marker, so it is done when the body ends after a finish reason.
struct Chunks {
    redactor: Redactor,
    reading: Reading,
}

impl Decoder for Chunks {
    fn event(&mut self, event: SseEvent) -> Result<Vec<StreamEvent>, ProviderError> {
        if event.data.trim().is_empty() {
            return Ok(Vec::new());
        }
        if let Ok(error) = serde_json::from_str::<ErrorBody>(&event.data) {
            return Err(self.redactor.stream_error(&error.error));
        }
        self.reading
            .answer(sse::json(&event.data, "a generateContent chunk")?)
    }

    fn end(&mut self) -> Result<Vec<StreamEvent>, ProviderError> {
        Ok(vec![self.reading.done()?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_results_take_the_name_of_the_latest_call_with_their_id() {
        let call = |id: &str, name: &str| ChatMessage {
            tool_calls: vec![ToolCall {
                id: id.into(),
                name: name.into(),
                arguments: "{}".into(),
            }],
            ..ChatMessage::new(Role::Assistant, "")
        };
        let result = |id: Option<&str>, content: &str| ChatMessage {
            tool_call_id: id.map(str::to_owned),
            ..ChatMessage::new(Role::Tool, content)
        };
        let messages = vec![
            ChatMessage::new(Role::User, "go"),
            call("call_0", "first"),
            result(Some("call_0"), "1"),
            call("call_0", "second"),
            result(Some("call_0"), r#"{"ok":true}"#),
            result(Some("call_9"), "orphan"),
            result(None, "no id"),
        ];
        let contents = serde_json::to_value(contents(&messages)).unwrap();
        assert_eq!(
            contents,
            json!([
                {"role": "user", "parts": [{"text": "go"}]},
                {"role": "model", "parts": [{"functionCall": {"name": "first", "args": {}}}]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "first", "response": {"result": "1"}}}
                ]},
                {"role": "model", "parts": [{"functionCall": {"name": "second", "args": {}}}]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "second", "response": {"ok": true}}},
                    {"text": "orphan"},
                    {"text": "no id"}
                ]}
            ])
        );
    }

    #[test]
    fn finish_reasons_in_openai_terms() {
        assert_eq!(finish_reason("STOP"), "stop");
        assert_eq!(finish_reason("MAX_TOKENS"), "length");
        assert_eq!(finish_reason("SAFETY"), "content_filter");
        assert_eq!(finish_reason("RECITATION"), "content_filter");
        assert_eq!(
            finish_reason("MALFORMED_FUNCTION_CALL"),
            "malformed_function_call"
        );
    }
}
