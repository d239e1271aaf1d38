//! Chat templates: the Jinja2 `tokenizer.chat_template` that GGUF and Hugging Face
//! models ship, rendered with minijinja.
//!
//! The environment mirrors the one `transformers` renders with: `trim_blocks` and
//! `lstrip_blocks` on, loop controls (`break`/`continue`), Python string and dict
//! methods (`.strip()`, `.startswith()`, `.items()`, … from minijinja-contrib's
//! pycompat), and the globals templates call: `raise_exception(msg)`,
//! `strftime_now(format)`, and a `tojson` filter formatted as Python's `json.dumps`
//! (`", "` and `": "` separators, no HTML escaping). Booleans and none print as
//! Python does (`True`, `False`, `None`). The context holds `messages`,
//! `bos_token`, `eos_token` and `add_generation_prompt`.
//!
//! Differences from Python: `strftime_now` uses UTC (Python uses local time), and
//! `tojson` writes the keys of dicts built inside the template sorted (minijinja's maps
//! are ordered by key; messages keep `role`, `content` order).

use std::io;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value, ValueKind};
use minijinja::{context, Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, or whatever roles the template knows.
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse; the message carries minijinja's line.
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)` (e.g. roles not alternating).
    #[error("chat template raised an exception: {0}")]
    Raised(String),
    /// Any other failure while rendering (bad operation, unknown filter, …).
    #[error("chat template render error: {0}")]
    Render(String),
}

/// The name the template is stored under; it shows up in error locations.
const NAME: &str = "chat_template";

/// ChatML, as Qwen and many fine-tunes use it, without a default system prompt.
const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template with the model's special tokens.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Carried as the error source so `render` can tell a template's own exception from
/// an engine error.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Compiles `template`; a syntax error is reported here rather than at render.
    pub fn new(template: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        // What transformers' ImmutableSandboxedEnvironment sets; templates such as
        // Zephyr's put each block tag on its own line and rely on it.
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Syntax(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Jinja2 prints Python's `str()`: `True`, `False`, `None` (minijinja: `true`, …).
        env.set_formatter(|out, state, value| match value.kind() {
            ValueKind::Bool => Ok(out.write_str(if value.is_true() { "True" } else { "False" })?),
            ValueKind::None => Ok(out.write_str("None")?),
            _ => minijinja::escape_formatter(out, state, value),
        });
        env.add_function("raise_exception", |msg: String| -> Result<Value, _> {
            Err(
                minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone())
                    .with_source(RaisedException(msg)),
            )
        });
        env.add_function("strftime_now", |format: String| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            strftime(now, &format)
        });
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, template.to_owned())
            .map_err(|e| ChatError::Syntax(e.to_string()))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    /// The fallback for models without a template: ChatML with `<|im_end|>` as EOS.
    pub fn chatml() -> Self {
        // The constant template compiles (tested); the empty environment is only a
        // formal fallback so no panic path exists.
        Self::new(CHATML, "", "<|im_end|>").unwrap_or_else(|_| Self {
            env: Environment::new(),
            bos_token: String::new(),
            eos_token: "<|im_end|>".to_owned(),
        })
    }

    /// Pins `strftime_now` to a Unix time (seconds), for reproducible prompts and tests.
    pub fn with_fixed_time(mut self, unix_seconds: i64) -> Self {
        self.env
            .add_function("strftime_now", move |format: String| {
                strftime(unix_seconds, &format)
            });
        self
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders the conversation; with `add_generation_prompt` the template appends
    /// the header that starts the assistant's reply.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| ChatError::Render(e.to_string()))?;
        let ctx = context! {
            messages => Value::from(Serde(messages)),
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
            add_generation_prompt => add_generation_prompt,
        };
        template.render(ctx).map_err(|e| classify(&e))
    }
}

fn classify(err: &minijinja::Error) -> ChatError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(raised) = e.downcast_ref::<RaisedException>() {
            return ChatError::Raised(raised.0.clone());
        }
        source = e.source();
    }
    match err.kind() {
        ErrorKind::SyntaxError => ChatError::Syntax(err.to_string()),
        _ => ChatError::Render(err.to_string()),
    }
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False,
/// indent=None, separators=None)`, accepting `indent` positionally too (Jinja's own
/// signature).
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => Some(" ".repeat(usize::try_from(v)?)),
        },
    };
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    // Keys come out sorted whatever this says (see the module docs).
    let _sort_keys = kwargs.get::<Option<bool>>("sort_keys")?;
    let separators = kwargs.get::<Option<Vec<String>>>("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(seps) => match seps.as_slice() {
            [item, key] => (item.clone(), key.clone()),
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: separators must be a pair (item, key)",
                ))
            }
        },
        // Python drops the space after ',' when indenting.
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let mut out = Vec::new();
    let formatter = PyJsonFormatter {
        indent,
        item_sep,
        key_sep,
        level: 0,
        has_value: false,
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    serde::Serialize::serialize(value, &mut ser).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: cannot serialize")
            .with_source(e)
    })?;
    let mut json = String::from_utf8(out).map_err(|e| {
        minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: not UTF-8").with_source(e)
    })?;
    if ensure_ascii {
        json = escape_non_ascii(&json);
    }
    Ok(Value::from_safe_string(json))
}

/// `\uXXXX` escapes (UTF-16, surrogate pairs above the BMP) as `ensure_ascii=True`.
/// Non-ASCII can only occur inside JSON strings, so escaping the whole text is safe.
fn escape_non_ascii(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{u:04x}"));
            }
        }
    }
    out
}

/// serde_json formatter producing Python `json.dumps` layout.
struct PyJsonFormatter {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    level: usize,
    /// Whether the innermost open container has an element (empty ones stay `[]`).
    has_value: bool,
}

impl PyJsonFormatter {
    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level = self.level.saturating_sub(1);
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(bracket)
    }

    fn element<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyJsonFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.element(w, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.element(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Proleptic Gregorian (year, month 1-12, day 1-31) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// The subset of C `strftime` that chat templates use (`%d %b %Y` and friends), in
/// UTC; unknown directives are copied through.
fn strftime(unix_seconds: i64, format: &str) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday.
    let month_name = MONTHS[(month as usize - 1) % 12];
    let day_name = WEEKDAYS[weekday];
    const CUM_DAYS: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM_DAYS[(month as usize - 1) % 12] + day + u32::from(month > 2 && is_leap(year));
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        match d {
            'Y' => out.push_str(&year.to_string()),
            'y' => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            'm' => out.push_str(&format!("{month:02}")),
            'd' => out.push_str(&format!("{day:02}")),
            'e' => out.push_str(&format!("{day:2}")),
            'j' => out.push_str(&format!("{yday:03}")),
            'H' => out.push_str(&format!("{hour:02}")),
            'I' => out.push_str(&format!("{hour12:02}")),
            'M' => out.push_str(&format!("{minute:02}")),
            'S' => out.push_str(&format!("{second:02}")),
            'p' => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            'B' => out.push_str(month_name),
            'b' | 'h' => out.push_str(&month_name[..3]),
            'A' => out.push_str(day_name),
            'a' => out.push_str(&day_name[..3]),
            'F' => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            'T' => out.push_str(&format!("{hour:02}:{minute:02}:{second:02}")),
            '%' => out.push('%'),
            other => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Templates as published in each model's tokenizer_config.json, JSON-unescaped:
    // a JSON "\n" is a real newline here, a JSON "\\n" a Jinja escape (`\n` in a raw
    // string).

    /// Qwen/Qwen2-7B-Instruct.
    const QWEN2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// meta-llama/Llama-2-7b-chat-hf.
    const LLAMA2: &str = r#"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"#;

    /// meta-llama/Meta-Llama-3-8B-Instruct.
    const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

    /// HuggingFaceH4/zephyr-7b-beta: one tag per line, so it depends on trim_blocks.
    const ZEPHYR: &str = "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}";

    fn template(src: &str, bos: &str, eos: &str) -> ChatTemplate {
        match ChatTemplate::new(src, bos, eos) {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        }
    }

    fn render(t: &ChatTemplate, messages: &[ChatMessage], gen: bool) -> String {
        match t.render(messages, gen) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    fn render_str(src: &str, messages: &[ChatMessage]) -> Result<String, ChatError> {
        ChatTemplate::new(src, "<s>", "</s>")?
            .with_fixed_time(1_721_952_000)
            .render(messages, false)
    }

    #[test]
    fn qwen2_chatml_inserts_the_default_system_prompt() {
        let t = template(QWEN2, "", "<|im_end|>");
        let msgs = [
            ChatMessage::user("Hello!"),
            ChatMessage::assistant("Hi! How can I help?"),
            ChatMessage::user("What is 2+2?"),
        ];
        assert_eq!(
            render(&t, &msgs, true),
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHello!<|im_end|>\n\
             <|im_start|>assistant\nHi! How can I help?<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        let msgs = [
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hello!"),
            ChatMessage::assistant("Hi."),
        ];
        assert_eq!(
            render(&t, &msgs, false),
            "<|im_start|>system\nBe brief.<|im_end|>\n\
             <|im_start|>user\nHello!<|im_end|>\n\
             <|im_start|>assistant\nHi.<|im_end|>\n"
        );
    }

    #[test]
    fn llama2_folds_the_system_prompt_into_the_first_instruction() {
        let t = template(LLAMA2, "<s>", "</s>");
        let msgs = [
            ChatMessage::system("You are a pirate."),
            ChatMessage::user(" Hello! "),
            ChatMessage::assistant("Arr, hello there!\n"),
        ];
        assert_eq!(
            render(&t, &msgs, true),
            // strip() trims the whole folded content, so the user's leading space stays.
            "<s>[INST] <<SYS>>\nYou are a pirate.\n<</SYS>>\n\n Hello! [/INST] Arr, hello there! </s>"
        );
    }

    #[test]
    fn llama2_raise_exception_becomes_chat_error() {
        let t = template(LLAMA2, "<s>", "</s>");
        let msgs = [
            ChatMessage::user("one"),
            ChatMessage::user("two"),
            ChatMessage::assistant("three"),
        ];
        let err = t.render(&msgs, false);
        assert_eq!(
            err,
            Err(ChatError::Raised(
                "Conversation roles must alternate user/assistant/user/assistant/...".into()
            ))
        );
        let msg = err.map_err(|e| e.to_string()).err();
        assert_eq!(
            msg.as_deref(),
            Some("chat template raised an exception: Conversation roles must alternate user/assistant/user/assistant/...")
        );
    }

    #[test]
    fn llama3_headers_with_bos_and_trimmed_content() {
        let t = template(LLAMA3, "<|begin_of_text|>", "<|eot_id|>");
        let msgs = [
            ChatMessage::user("  What is the capital of France?\n"),
            ChatMessage::assistant("Paris."),
            ChatMessage::user("And of Italy?"),
        ];
        assert_eq!(
            render(&t, &msgs, true),
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n\
             What is the capital of France?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nAnd of Italy?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn zephyr_relies_on_trim_blocks() {
        let t = template(ZEPHYR, "<s>", "</s>");
        let msgs = [
            ChatMessage::system("You are a friendly chatbot."),
            ChatMessage::user("Hello"),
            ChatMessage::assistant("Hi there"),
        ];
        assert_eq!(
            render(&t, &msgs, false),
            "<|system|>\nYou are a friendly chatbot.</s>\n<|user|>\nHello</s>\n<|assistant|>\nHi there</s>\n"
        );
        let msgs = [
            ChatMessage::user("Hello"),
            ChatMessage::assistant("Hi there"),
            ChatMessage::user("Tell me a joke."),
        ];
        assert_eq!(
            render(&t, &msgs, true),
            "<|user|>\nHello</s>\n<|assistant|>\nHi there</s>\n<|user|>\nTell me a joke.</s>\n<|assistant|>\n"
        );
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml();
        assert_eq!(t.eos_token(), "<|im_end|>");
        let msgs = [
            ChatMessage::system("S"),
            ChatMessage::user("U"),
            ChatMessage::assistant("A"),
        ];
        assert_eq!(
            render(&t, &msgs, true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n\
             <|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(render(&t, &[], false), "");
    }

    #[test]
    fn syntax_errors_are_reported_at_construction() {
        let err = ChatTemplate::new("{% for m in messages %}{{ m.content }}", "", "");
        match err {
            Err(ChatError::Syntax(msg)) => {
                assert!(msg.contains("syntax error"), "{msg}");
                assert!(msg.contains("chat_template:1"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ChatTemplate::new("{{ 'unterminated }}", "", ""),
            Err(ChatError::Syntax(_))
        ));
    }

    #[test]
    fn render_errors_carry_the_message() {
        let msgs = [ChatMessage::user("hi")];
        match render_str("{{ messages[0].content.no_such_method() }}", &msgs) {
            Err(ChatError::Render(msg)) => assert!(msg.contains("no_such_method"), "{msg}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            render_str("{{ raise_exception('bad ' ~ messages[0].role) }}", &msgs),
            Err(ChatError::Raised("bad user".into()))
        );
    }

    #[test]
    fn strftime_now_formats_the_current_or_pinned_date() {
        // 2024-07-26T00:00:00Z, a Friday: Llama 3.1's default "Today Date".
        assert_eq!(
            render_str("{{ strftime_now('%d %b %Y') }}", &[]),
            Ok("26 Jul 2024".into())
        );
        let t = 1_721_952_000 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(
            strftime(t, "%A %a %B %j %F %T %I%p %y %e %Q %%"),
            "Friday Fri July 208 2024-07-26 13:05:09 01PM 24 26 %Q %"
        );
        assert_eq!(strftime(-1, "%F %T"), "1969-12-31 23:59:59");
        assert_eq!(strftime(951_782_400, "%F %j %a"), "2000-02-29 060 Tue");
        // Unpinned, it renders today's date in the same shape.
        let today = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", "", "")
            .and_then(|t| t.render(&[], false));
        assert!(
            matches!(&today, Ok(s) if s.len() == 10 && s.starts_with("20")),
            "{today:?}"
        );
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let msgs = [ChatMessage::user("Hi \"you\" <b>é</b>")];
        assert_eq!(
            render_str("{{ messages | tojson }}", &msgs),
            Ok(r#"[{"role": "user", "content": "Hi \"you\" <b>é</b>"}]"#.into())
        );
        assert_eq!(
            render_str(
                "{{ {'b': [1, 2.5, none, true], 'a': 'é', 'c': {}, 'd': []} | tojson(indent=2) }}",
                &[]
            ),
            Ok("{\n  \"a\": \"é\",\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"c\": {},\n  \"d\": []\n}".into())
        );
        assert_eq!(
            render_str("{{ ['é', '🦀'] | tojson(ensure_ascii=true) }}", &[]),
            Ok(r#"["\u00e9", "\ud83e\udd80"]"#.into())
        );
        assert_eq!(
            render_str("{{ {'a': [1, 2]} | tojson(separators=[',', ':']) }}", &[]),
            Ok(r#"{"a":[1,2]}"#.into())
        );
        assert_eq!(
            render_str("{{ 'x' | tojson(4) }}", &[]),
            Ok(r#""x""#.into())
        );
    }

    #[test]
    fn python_methods_loop_controls_and_namespace() {
        let msgs = [
            ChatMessage::system("  sys  "),
            ChatMessage::user("a,b,c"),
            ChatMessage::assistant("<think>x</think>answer"),
            ChatMessage::user("last"),
        ];
        let src = "{% set ns = namespace(found=false) %}\
            {% for m in messages %}\
            {% if m.role == 'system' %}{% set ns.found = true %}{% continue %}{% endif %}\
            {% if loop.index0 == 3 %}{% break %}{% endif %}\
            [{{ m.role.upper() }}:{{ m.content.split('</think>')[-1].strip() }}\
            |{{ m.content.startswith('a,') }}|{{ m.content.split(',') | length }}]\
            {% endfor %}\
            {{ ns.found }} {{ messages[0].content.strip() }} {{ none }}\
            {% for k, v in {'k': 1}.items() %} {{ k }}={{ v }}{% endfor %}\
            {{ messages[0].get('role') }} {{ messages[0].get('tools', 'none') }}";
        assert_eq!(
            render_str(src, &msgs),
            Ok("[USER:a,b,c|True|3][ASSISTANT:answer|False|1]True sys None k=1system none".into())
        );
    }

    #[test]
    fn lstrip_blocks_and_context_variables() {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n{{ bos_token }}{{ m.content }}{{ eos_token }}\n    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}GEN{% endif %}";
        let t = template(src, "<B>", "<E>");
        let msgs = [
            ChatMessage::user("u1"),
            ChatMessage::assistant("a"),
            ChatMessage::user("u2"),
        ];
        assert_eq!(render(&t, &msgs, true), "<B>u1<E>\n<B>u2<E>\nGEN");
        assert_eq!(render(&t, &msgs, false), "<B>u1<E>\n<B>u2<E>\n");
    }
}
