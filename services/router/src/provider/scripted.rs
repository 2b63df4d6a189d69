//! Canned replies for tests and demos, chosen by rules in the deployment's config. Used only
//! where a deployment declares `provider = "scripted"`.

use async_trait::async_trait;

use super::{ChatRequest, ChatResponse, Provider, TokenUsage};
use crate::config::ScriptRule;
use crate::error::ProviderError;

#[derive(Debug)]
pub struct Scripted {
    rules: Vec<ScriptRule>,
}

impl Scripted {
    pub fn new(rules: Vec<ScriptRule>) -> Self {
        Self { rules }
    }
}

#[async_trait]
impl Provider for Scripted {
    /// The first rule whose `contains` occurs in the last user message (or that has none)
    /// answers, after its delay. Usage is an estimate (see [`TokenUsage::estimate`]).
    async fn complete(&self, request: &ChatRequest) -> Result<ChatResponse, ProviderError> {
        let last = request.last_user_message();
        let rule = self
            .rules
            .iter()
            .find(|rule| {
                rule.contains
                    .as_deref()
                    .is_none_or(|text| last.contains(text))
            })
            .ok_or(ProviderError::NoScriptRule)?;
        // Cancel-safe: dropping this future (a timeout, a cancelled call) ends the wait.
        tokio::time::sleep(rule.delay).await;
        if let Some(class) = rule.fail {
            return Err(ProviderError::Scripted(class));
        }
        Ok(ChatResponse {
            tool_calls: Vec::new(),
            content: rule.reply.clone(),
            finish_reason: "stop".into(),
            usage: TokenUsage::estimate(request, &rule.reply),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::error::ErrorClass;
    use crate::provider::{ChatMessage, Role};

    fn rule(contains: Option<&str>, reply: &str) -> ScriptRule {
        ScriptRule {
            contains: contains.map(str::to_owned),
            reply: reply.into(),
            delay: Duration::ZERO,
            fail: None,
        }
    }

    fn ask(text: &str) -> ChatRequest {
        ChatRequest {
            messages: vec![
                ChatMessage::new(Role::User, "weather please"),
                ChatMessage::new(Role::Assistant, "which city?"),
                ChatMessage::new(Role::User, text),
            ],
            ..ChatRequest::default()
        }
    }

    #[tokio::test]
    async fn first_matching_rule_on_the_last_user_message_answers() {
        let scripted = Scripted::new(vec![
            rule(Some("weather"), "sunny"),
            rule(Some("Paris"), "rainy in Paris"),
            rule(None, "I do not know"),
        ]);
        let reply = scripted.complete(&ask("in Paris")).await.unwrap();
        assert_eq!(reply.content, "rainy in Paris");
        assert_eq!(reply.finish_reason, "stop");
        assert_eq!(
            reply.usage,
            TokenUsage {
                prompt: 6,
                completion: 3
            }
        );
        let fallback = scripted.complete(&ask("in Oslo")).await.unwrap();
        assert_eq!(fallback.content, "I do not know");
    }

    #[tokio::test]
    async fn no_matching_rule_is_permanent() {
        let scripted = Scripted::new(vec![rule(Some("x"), "y")]);
        let error = scripted.complete(&ask("z")).await.unwrap_err();
        assert_eq!(error, ProviderError::NoScriptRule);
        assert_eq!(error.class(), ErrorClass::Permanent);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_injected_after_the_delay() {
        let scripted = Scripted::new(vec![ScriptRule {
            delay: Duration::from_secs(2),
            fail: Some(ErrorClass::ExternalRateLimit),
            ..rule(Some("slow"), "")
        }]);
        let started = tokio::time::Instant::now();
        let error = scripted.complete(&ask("slow down")).await.unwrap_err();
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(error.class(), ErrorClass::ExternalRateLimit);

        let request = ask("slow");
        let cut = tokio::time::timeout(Duration::from_secs(1), scripted.complete(&request));
        assert!(cut.await.is_err(), "a timeout cancels the delay");
    }
}
