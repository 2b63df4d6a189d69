//! Domain types of conversation sessions and the rules an append must follow. No prost types
//! here: the gRPC adapter converts at the edge.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};

use crate::Error;

/// Longest tenant or session id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::System, Role::User, Role::Assistant, Role::Tool];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or(())
    }
}

/// A message about to be stored, with its token estimate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub role: Role,
    pub content: String,
    pub token_count: u32,
}

/// A validated append: every field has passed [`Limits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    pub tenant: String,
    pub session_id: String,
    pub run_id: Option<String>,
    pub task_id: Option<String>,
    pub messages: Vec<NewMessage>,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub role: Role,
    pub content: String,
    pub token_count: u32,
    pub created_at: DateTime<Utc>,
}

/// A session's totals after an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub message_count: u64,
    pub token_count: u64,
}

/// One page of a session, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub messages: Vec<StoredMessage>,
    /// The `after_seq` of the next page; `None` when this page is the last.
    pub next_after_seq: Option<u64>,
}

/// A validated page request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub tenant: String,
    pub session_id: String,
    pub after_seq: u64,
    pub page_size: u32,
}

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1000;

/// Size limits from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_messages_per_append: usize,
    pub max_page_bytes: usize,
    pub max_texts_per_embed: usize,
}

/// The token count of `content`, estimated without a tokenizer: one token per four characters
/// (Unicode scalar values), rounded up, and at least one for any message (even an empty one,
/// which still costs framing tokens in a prompt).
pub fn estimate_tokens(content: &str) -> u32 {
    let tokens = content.chars().count().div_ceil(4).max(1);
    u32::try_from(tokens).unwrap_or(u32::MAX)
}

/// Checks a tenant or session id: required, bounded, storable.
pub fn check_id(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > MAX_ID_BYTES {
        return Err(Error::invalid(
            field,
            format!("is {} bytes long; the limit is {MAX_ID_BYTES}", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL characters"));
    }
    Ok(())
}

/// An optional id: empty means absent.
fn optional_id(field: &str, value: String) -> Result<Option<String>, Error> {
    if value.is_empty() {
        return Ok(None);
    }
    check_id(field, &value)?;
    Ok(Some(value))
}

impl Limits {
    /// Validates an embed request: a tenant, 1 to `max_texts_per_embed` texts, none empty or
    /// longer than a message may be.
    pub fn embed(&self, tenant: &str, texts: Vec<String>) -> Result<Vec<String>, Error> {
        check_id("tenant", tenant)?;
        if texts.is_empty() || texts.len() > self.max_texts_per_embed {
            return Err(Error::invalid(
                "texts",
                format!("between 1 and {} texts per call", self.max_texts_per_embed),
            ));
        }
        for (index, text) in texts.iter().enumerate() {
            if text.trim().is_empty() {
                return Err(Error::invalid(
                    format!("texts[{index}]"),
                    "must not be empty",
                ));
            }
            if text.len() > self.max_message_bytes {
                return Err(Error::invalid(
                    format!("texts[{index}]"),
                    format!(
                        "is {} bytes long; the limit is {}",
                        text.len(),
                        self.max_message_bytes
                    ),
                ));
            }
        }
        Ok(texts)
    }

    /// Validates an append request given as plain strings; `messages` are `(role, content)`.
    pub fn append(
        &self,
        tenant: String,
        session_id: String,
        run_id: String,
        task_id: String,
        messages: Vec<(String, String)>,
    ) -> Result<Append, Error> {
        check_id("tenant", &tenant)?;
        check_id("session_id", &session_id)?;
        let run_id = optional_id("run_id", run_id)?;
        let task_id = optional_id("task_id", task_id)?;
        if messages.is_empty() {
            return Err(Error::invalid(
                "messages",
                "at least one message is required",
            ));
        }
        if messages.len() > self.max_messages_per_append {
            return Err(Error::invalid(
                "messages",
                format!(
                    "{} messages exceed the limit of {} per append; split the append",
                    messages.len(),
                    self.max_messages_per_append
                ),
            ));
        }
        let messages = messages
            .into_iter()
            .enumerate()
            .map(|(i, (role, content))| self.message(i, &role, content))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Append {
            tenant,
            session_id,
            run_id,
            task_id,
            messages,
        })
    }

    fn message(&self, index: usize, role: &str, content: String) -> Result<NewMessage, Error> {
        let role: Role = role.parse().map_err(|()| {
            Error::invalid(
                format!("messages[{index}].role"),
                format!("unknown role {role:?}; expected system, user, assistant or tool"),
            )
        })?;
        if content.len() > self.max_message_bytes {
            return Err(Error::invalid(
                format!("messages[{index}].content"),
                format!(
                    "is {} bytes; the limit is {} bytes per message",
                    content.len(),
                    self.max_message_bytes
                ),
            ));
        }
        if content.contains('\0') {
            return Err(Error::invalid(
                format!("messages[{index}].content"),
                "must not contain NUL characters",
            ));
        }
        let token_count = estimate_tokens(&content);
        Ok(NewMessage {
            role,
            content,
            token_count,
        })
    }

    /// Validates a page request; `page_size` 0 means the default, above the maximum means the
    /// maximum.
    pub fn page(
        &self,
        tenant: String,
        session_id: String,
        after_seq: u64,
        page_size: u32,
    ) -> Result<PageRequest, Error> {
        check_id("tenant", &tenant)?;
        check_id("session_id", &session_id)?;
        if i64::try_from(after_seq).is_err() {
            return Err(Error::invalid(
                "after_seq",
                "is larger than any sequence number",
            ));
        }
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        Ok(PageRequest {
            tenant,
            session_id,
            after_seq,
            page_size,
        })
    }
}

/// How many of the candidate messages (by content size, oldest first) go into one page: at most
/// `page_size`, and no more than fit `max_bytes` — but always at least one.
pub fn page_cut(sizes: &[usize], page_size: usize, max_bytes: usize) -> usize {
    let mut total = 0usize;
    let mut taken = 0usize;
    for &size in sizes.iter().take(page_size) {
        total = total.saturating_add(size);
        if taken > 0 && total > max_bytes {
            break;
        }
        taken += 1;
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_message_bytes: 10,
        max_messages_per_append: 2,
        max_page_bytes: 100,
        max_texts_per_embed: 2,
    };

    fn msg(role: &str, content: &str) -> (String, String) {
        (role.to_owned(), content.to_owned())
    }

    fn append(
        tenant: &str,
        session: &str,
        messages: Vec<(String, String)>,
    ) -> Result<Append, Error> {
        LIMITS.append(
            tenant.into(),
            session.into(),
            String::new(),
            String::new(),
            messages,
        )
    }

    fn field_of(result: Result<Append, Error>) -> String {
        match result {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("expected invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn token_estimate_rounds_up_with_a_floor_of_one() {
        assert_eq!(estimate_tokens(""), 1);
        assert_eq!(estimate_tokens("a"), 1);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        // Characters, not bytes: four two-byte characters are one token.
        assert_eq!(estimate_tokens("éééé"), 1);
    }

    #[test]
    fn roles_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!("bot".parse::<Role>().is_err());
        assert!("User".parse::<Role>().is_err());
    }

    #[test]
    fn valid_append_keeps_order_and_estimates() {
        let append = append(
            "acme",
            "s1",
            vec![msg("user", "hello"), msg("assistant", "")],
        )
        .expect("a valid append");
        assert_eq!(append.messages[0].role, Role::User);
        assert_eq!(append.messages[0].token_count, 2);
        assert_eq!(append.messages[1].role, Role::Assistant);
        assert_eq!(append.run_id, None);
    }

    #[test]
    fn each_rule_names_its_field() {
        assert_eq!(field_of(append("", "s", vec![msg("user", "x")])), "tenant");
        assert_eq!(
            field_of(append("t", "", vec![msg("user", "x")])),
            "session_id"
        );
        assert_eq!(field_of(append("t", "s", vec![])), "messages");
        assert_eq!(
            field_of(append("t", "s", vec![msg("user", "x"); 3])),
            "messages"
        );
        assert_eq!(
            field_of(append("t", "s", vec![msg("user", "x"), msg("bot", "x")])),
            "messages[1].role"
        );
        assert_eq!(
            field_of(append("t", "s", vec![msg("user", "01234567890")])),
            "messages[0].content"
        );
        assert_eq!(
            field_of(append("t", "s", vec![msg("user", "a\0b")])),
            "messages[0].content"
        );
        assert_eq!(
            field_of(append(
                &"t".repeat(MAX_ID_BYTES + 1),
                "s",
                vec![msg("user", "x")]
            )),
            "tenant"
        );
    }

    #[test]
    fn content_limit_is_inclusive() {
        assert!(append("t", "s", vec![msg("user", "0123456789")]).is_ok());
    }

    #[test]
    fn page_size_defaults_and_clamps() {
        let page = |size| {
            LIMITS
                .page("t".into(), "s".into(), 0, size)
                .expect("a valid page")
                .page_size
        };
        assert_eq!(page(0), DEFAULT_PAGE_SIZE);
        assert_eq!(page(7), 7);
        assert_eq!(page(5000), MAX_PAGE_SIZE);
        assert!(LIMITS.page("t".into(), "s".into(), u64::MAX, 1).is_err());
        assert!(LIMITS.page("".into(), "s".into(), 0, 1).is_err());
    }

    #[test]
    fn page_cut_respects_count_and_bytes_but_takes_one() {
        assert_eq!(page_cut(&[1, 1, 1], 2, 100), 2);
        assert_eq!(page_cut(&[40, 40, 40], 10, 100), 2);
        assert_eq!(page_cut(&[40, 60, 1], 10, 100), 2);
        assert_eq!(page_cut(&[500, 1], 10, 100), 1);
        assert_eq!(page_cut(&[], 10, 100), 0);
    }
}
