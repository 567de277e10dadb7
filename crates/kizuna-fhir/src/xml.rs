//! FHIR XML (`application/fhir+xml`) read into, and written from, the JSON form the rest of kizuna uses.
//!
//! XML does not say which elements repeat or what type a primitive is, so both directions are driven by
//! the [`TypeModel`]: repeating elements become arrays, `value` attributes become typed JSON primitives,
//! `id`s and extensions on primitives go to the `_name` sibling, and element order on output follows the
//! definitions.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use serde_json::{Map, Value};

use crate::model::{choice_suffix, TypeModel};

/// Why an XML document could not be read as a FHIR resource; names the element path.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum XmlError {
    /// Not well-formed XML.
    #[error("XML が不正です / malformed XML at byte {pos}: {msg}")]
    Malformed {
        /// Byte offset.
        pos: u64,
        /// The parser's message.
        msg: String,
    },
    /// An element the definitions do not have.
    #[error("不明な要素 / unknown element {path}")]
    UnknownElement {
        /// FHIRPath-style path of the element.
        path: String,
    },
    /// A primitive value that does not fit its type.
    #[error("値が不正です / invalid value at {path}: {msg}")]
    BadValue {
        /// Path of the element.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// Not a FHIR resource at the root.
    #[error("FHIR リソースではありません / not a FHIR resource: {0}")]
    NotAResource(String),
}

const FHIR_NS: &str = "http://hl7.org/fhir";
const MAX_DEPTH: usize = 128;

struct Accum {
    name: String,
    items: Vec<(Option<Value>, Option<Value>)>,
    many: bool,
}

struct XmlReader<'s, 'm> {
    src: &'s str,
    reader: Reader<&'s [u8]>,
    model: &'m TypeModel,
}

fn local_name(e: &BytesStart<'_>) -> String {
    String::from_utf8_lossy(e.local_name().as_ref()).to_string()
}

fn attr(e: &BytesStart<'_>, name: &str) -> Result<Option<String>, XmlError> {
    for a in e.attributes().with_checks(false) {
        let a = a.map_err(|err| XmlError::Malformed {
            pos: 0,
            msg: err.to_string(),
        })?;
        if a.key.local_name().as_ref() == name.as_bytes() && a.key.prefix().is_none() {
            let v = a.unescape_value().map_err(|err| XmlError::Malformed {
                pos: 0,
                msg: err.to_string(),
            })?;
            return Ok(Some(v.to_string()));
        }
    }
    Ok(None)
}

/// Turns a primitive's XML `value` attribute into the JSON FHIR uses for that type.
pub fn primitive_to_json(ty: &str, v: &str, path: &str) -> Result<Value, XmlError> {
    let bad = |msg: &str| XmlError::BadValue {
        path: path.to_string(),
        msg: msg.to_string(),
    };
    Ok(match ty {
        "boolean" => match v {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(bad("boolean は true/false")),
        },
        "integer" | "positiveInt" | "unsignedInt" => Value::Number(
            v.parse::<i64>()
                .map_err(|_| bad("整数ではありません / not an integer"))?
                .into(),
        ),
        "decimal" => {
            // Keep the written precision (`1.50` stays `1.50`).
            let n: serde_json::Number =
                serde_json::from_str(v).map_err(|_| bad("小数ではありません / not a decimal"))?;
            Value::Number(n)
        }
        _ => Value::String(v.to_string()),
    })
}

impl<'s, 'm> XmlReader<'s, 'm> {
    fn malformed(&self, msg: impl ToString) -> XmlError {
        XmlError::Malformed {
            pos: self.reader.buffer_position(),
            msg: msg.to_string(),
        }
    }

    fn next(&mut self) -> Result<Event<'s>, XmlError> {
        self.reader.read_event().map_err(|e| self.malformed(e))
    }

    /// Reads a resource whose start tag was just read.
    fn resource(
        &mut self,
        start: &BytesStart<'_>,
        empty: bool,
        path: &str,
        depth: usize,
    ) -> Result<Value, XmlError> {
        let rt = local_name(start);
        if !self.model.is_resource(&rt) {
            return Err(XmlError::NotAResource(rt));
        }
        let mut obj = Map::new();
        obj.insert("resourceType".into(), Value::String(rt.clone()));
        if !empty {
            self.children(&rt, &mut obj, path, depth)?;
        }
        Ok(Value::Object(obj))
    }

    /// Reads child elements into `obj` until the parent's end tag.
    fn children(
        &mut self,
        ty: &str,
        obj: &mut Map<String, Value>,
        path: &str,
        depth: usize,
    ) -> Result<(), XmlError> {
        if depth > MAX_DEPTH {
            return Err(self.malformed("入れ子が深すぎます / nested too deeply"));
        }
        let mut accs: Vec<Accum> = Vec::new();
        loop {
            let ev = self.next()?;
            let (start, empty) = match ev {
                Event::Start(s) => (s, false),
                Event::Empty(s) => (s, true),
                Event::End(_) => break,
                Event::Eof => {
                    return Err(self.malformed("予期しない終端 / unexpected end of document"))
                }
                Event::Text(t) => {
                    let txt = t.unescape().map_err(|e| self.malformed(e))?;
                    if !txt.trim().is_empty() {
                        return Err(XmlError::BadValue {
                            path: path.to_string(),
                            msg: "要素の外にテキストがあります / text outside a value attribute"
                                .into(),
                        });
                    }
                    continue;
                }
                _ => continue,
            };
            let name = local_name(&start);
            let child_path = format!("{path}.{name}");
            let Some((el, chosen)) = self.model.element_for_json_key(ty, &name) else {
                return Err(XmlError::UnknownElement { path: child_path });
            };
            let many = el.many;
            let (value, ext) = self.element(&start, empty, &chosen, &child_path, depth + 1)?;
            match accs.iter_mut().find(|a| a.name == name) {
                Some(a) => a.items.push((value, ext)),
                None => accs.push(Accum {
                    name,
                    items: vec![(value, ext)],
                    many,
                }),
            }
        }
        for a in accs {
            let has_ext = a.items.iter().any(|(_, e)| e.is_some());
            let has_val = a.items.iter().any(|(v, _)| v.is_some());
            if a.many {
                if has_val {
                    obj.insert(
                        a.name.clone(),
                        Value::Array(
                            a.items
                                .iter()
                                .map(|(v, _)| v.clone().unwrap_or(Value::Null))
                                .collect(),
                        ),
                    );
                }
                if has_ext {
                    obj.insert(
                        format!("_{}", a.name),
                        Value::Array(
                            a.items
                                .into_iter()
                                .map(|(_, e)| e.unwrap_or(Value::Null))
                                .collect(),
                        ),
                    );
                }
            } else if let Some((v, e)) = a.items.into_iter().last() {
                if let Some(v) = v {
                    obj.insert(a.name.clone(), v);
                }
                if let Some(e) = e {
                    obj.insert(format!("_{}", a.name), e);
                }
            }
        }
        Ok(())
    }

    /// Reads one element of type `ty`; returns its JSON value and, for primitives, its `_name` object.
    fn element(
        &mut self,
        start: &BytesStart<'_>,
        empty: bool,
        ty: &str,
        path: &str,
        depth: usize,
    ) -> Result<(Option<Value>, Option<Value>), XmlError> {
        if ty == "xhtml" {
            return Ok((Some(Value::String(self.xhtml(start, empty)?)), None));
        }
        if self.model.is_primitive(ty) {
            let value = match attr(start, "value")? {
                Some(v) => Some(primitive_to_json(ty, &v, path)?),
                None => None,
            };
            let mut ext = Map::new();
            if let Some(id) = attr(start, "id")? {
                ext.insert("id".into(), Value::String(id));
            }
            if !empty {
                self.children("Element", &mut ext, path, depth)?;
            }
            let ext = if ext.is_empty() {
                None
            } else {
                Some(Value::Object(ext))
            };
            return Ok((value, ext));
        }
        if ty == "Resource" || self.model.is_resource(ty) {
            if empty {
                return Ok((None, None));
            }
            // The container holds exactly one resource element.
            let mut out = None;
            loop {
                match self.next()? {
                    Event::Start(s) => {
                        let r = self.resource(&s, false, path, depth + 1)?;
                        out = Some(r);
                    }
                    Event::Empty(s) => out = Some(self.resource(&s, true, path, depth + 1)?),
                    Event::End(_) => break,
                    Event::Eof => {
                        return Err(self.malformed("予期しない終端 / unexpected end of document"))
                    }
                    _ => {}
                }
            }
            return Ok((out, None));
        }
        let mut obj = Map::new();
        if let Some(id) = attr(start, "id")? {
            obj.insert("id".into(), Value::String(id));
        }
        if ty == "Extension" || self.model.is_subtype(ty, "Extension") {
            if let Some(url) = attr(start, "url")? {
                obj.insert("url".into(), Value::String(url));
            }
        }
        if !empty {
            self.children(ty, &mut obj, path, depth)?;
        }
        Ok((Some(Value::Object(obj)), None))
    }

    /// Captures a narrative `div` as the XHTML text FHIR JSON stores.
    fn xhtml(&mut self, start: &BytesStart<'_>, empty: bool) -> Result<String, XmlError> {
        let start_len = start.len() + if empty { 3 } else { 2 };
        let end_pos = self.reader.buffer_position() as usize;
        let begin = end_pos.saturating_sub(start_len);
        if empty {
            return Ok(self.src.get(begin..end_pos).unwrap_or("").to_string());
        }
        let mut depth = 1;
        while depth > 0 {
            match self.next()? {
                Event::Start(_) => depth += 1,
                Event::End(_) => depth -= 1,
                Event::Eof => return Err(self.malformed("div が閉じていません / unterminated div")),
                _ => {}
            }
        }
        let end = self.reader.buffer_position() as usize;
        let raw = self.src.get(begin..end).unwrap_or("");
        // FHIR JSON keeps the namespace declaration on the div.
        if raw.starts_with("<div") && !raw.contains("xmlns") {
            return Ok(raw.replacen("<div", "<div xmlns=\"http://www.w3.org/1999/xhtml\"", 1));
        }
        Ok(raw.to_string())
    }
}

/// Reads a FHIR resource from XML.
pub fn from_xml(src: &str, model: &TypeModel) -> Result<Value, XmlError> {
    let mut r = XmlReader {
        src,
        reader: Reader::from_str(src),
        model,
    };
    loop {
        match r.next()? {
            Event::Start(s) => {
                check_ns(&s)?;
                let name = local_name(&s);
                return r.resource(&s, false, &name, 0);
            }
            Event::Empty(s) => {
                check_ns(&s)?;
                let name = local_name(&s);
                return r.resource(&s, true, &name, 0);
            }
            Event::Eof => return Err(XmlError::NotAResource("空の文書 / empty document".into())),
            _ => {}
        }
    }
}

fn check_ns(s: &BytesStart<'_>) -> Result<(), XmlError> {
    match attr(s, "xmlns")? {
        Some(ns) if ns == FHIR_NS => Ok(()),
        Some(ns) => Err(XmlError::NotAResource(format!("名前空間 / namespace {ns}"))),
        None => Ok(()),
    }
}

fn escape_attr(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\t' => out.push_str("&#9;"),
            c => out.push(c),
        }
    }
    out
}

fn json_primitive_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Writes a resource (JSON form) as FHIR XML, elements in definition order.
pub fn to_xml(resource: &Value, model: &TypeModel) -> String {
    let mut out = String::new();
    let rt = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("Resource");
    out.push_str(&format!("<{rt} xmlns=\"{FHIR_NS}\">"));
    write_children(resource, rt, model, &mut out);
    out.push_str(&format!("</{rt}>"));
    out
}

/// The element names of a type in definition order, base type first.
fn ordered_elements<'m>(model: &'m TypeModel, ty: &str) -> Vec<&'m crate::model::ElementInfo> {
    let mut chain = Vec::new();
    let mut cur = model.get(ty);
    while let Some(t) = cur {
        chain.push(t);
        cur = t.base.as_deref().and_then(|b| model.get(b));
    }
    // Snapshots repeat inherited elements; keep each name once, in base-first order.
    let mut out: Vec<&crate::model::ElementInfo> = Vec::new();
    for e in chain.iter().rev().flat_map(|t| t.elements.iter()) {
        if !out.iter().any(|o| o.name == e.name) {
            out.push(e);
        }
    }
    out
}

fn write_children(v: &Value, ty: &str, model: &TypeModel, out: &mut String) {
    let Some(obj) = v.as_object() else { return };
    for el in ordered_elements(model, ty) {
        let keys: Vec<(String, &str)> = if el.choice {
            el.types
                .iter()
                .map(|t| (format!("{}{}", el.name, choice_suffix(t)), t.as_str()))
                .collect()
        } else {
            vec![(
                el.name.clone(),
                el.types.first().map(String::as_str).unwrap_or("Element"),
            )]
        };
        for (key, t) in keys {
            // id and url of elements are attributes, written with the start tag.
            if (key == "id" && !model.is_resource(ty))
                || (key == "url" && model.is_subtype(ty, "Extension"))
            {
                continue;
            }
            let val = obj.get(&key);
            let ext = obj.get(&format!("_{key}"));
            if val.is_none() && ext.is_none() {
                continue;
            }
            let n = match (val, ext) {
                (Some(Value::Array(a)), _) => a.len(),
                (None, Some(Value::Array(a))) => a.len(),
                _ => 1,
            };
            let pick = |x: Option<&Value>, i: usize| -> Option<Value> {
                match x {
                    Some(Value::Array(a)) => a.get(i).filter(|v| !v.is_null()).cloned(),
                    Some(Value::Null) | None => None,
                    Some(v) => Some(v.clone()),
                }
            };
            for i in 0..n {
                write_element(
                    &key,
                    t,
                    pick(val, i).as_ref(),
                    pick(ext, i).as_ref(),
                    model,
                    out,
                );
            }
        }
    }
}

fn write_element(
    name: &str,
    ty: &str,
    val: Option<&Value>,
    ext: Option<&Value>,
    model: &TypeModel,
    out: &mut String,
) {
    if ty == "xhtml" {
        if let Some(Value::String(s)) = val {
            // XML needs the XHTML namespace on the div even where the JSON left it out.
            if s.starts_with("<div") && !s.contains("xmlns") {
                out.push_str(&s.replacen("<div", "<div xmlns=\"http://www.w3.org/1999/xhtml\"", 1));
            } else {
                out.push_str(s);
            }
        }
        return;
    }
    if model.is_primitive(ty) {
        out.push('<');
        out.push_str(name);
        if let Some(id) = ext.and_then(|e| e.get("id")).and_then(Value::as_str) {
            out.push_str(&format!(" id=\"{}\"", escape_attr(id)));
        }
        if let Some(v) = val {
            out.push_str(&format!(
                " value=\"{}\"",
                escape_attr(&json_primitive_text(v))
            ));
        }
        let has_children = ext.map(|e| e.get("extension").is_some()).unwrap_or(false);
        if has_children {
            out.push('>');
            if let Some(e) = ext {
                write_children(e, "Element", model, out);
            }
            out.push_str(&format!("</{name}>"));
        } else {
            out.push_str("/>");
        }
        return;
    }
    let Some(v) = val else { return };
    if ty == "Resource" || model.is_resource(ty) {
        out.push_str(&format!("<{name}>"));
        let rt = v
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("Resource");
        out.push_str(&format!("<{rt}>"));
        write_children(v, rt, model, out);
        out.push_str(&format!("</{rt}></{name}>"));
        return;
    }
    out.push('<');
    out.push_str(name);
    if let Some(id) = v.get("id").and_then(Value::as_str) {
        out.push_str(&format!(" id=\"{}\"", escape_attr(id)));
    }
    if model.is_subtype(ty, "Extension") {
        if let Some(url) = v.get("url").and_then(Value::as_str) {
            out.push_str(&format!(" url=\"{}\"", escape_attr(url)));
        }
    }
    out.push('>');
    write_children(v, ty, model, out);
    out.push_str(&format!("</{name}>"));
}
