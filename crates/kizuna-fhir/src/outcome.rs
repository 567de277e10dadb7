//! FHIR OperationOutcome: the one shape every rejection, warning and validation result takes, with the
//! element path (`expression`) and the message in Japanese and English.

use serde::Serialize;
use serde_json::{json, Value};

/// How serious an issue is (FHIR `IssueSeverity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Processing could not continue.
    Fatal,
    /// The content is invalid.
    Error,
    /// Probably a problem, not a rejection.
    Warning,
    /// For information.
    Information,
}

impl Severity {
    /// The FHIR code.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// One issue: severity, FHIR `IssueType` code, where, and what (Japanese and English).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Issue {
    /// Severity.
    pub severity: Severity,
    /// FHIR `IssueType` code: `structure`, `required`, `value`, `invariant`, `code-invalid`, `not-supported` …
    pub code: &'static str,
    /// FHIRPath of the element (`Bundle.entry[2].resource.code.coding[0].code`).
    pub expression: String,
    /// Japanese text.
    pub ja: String,
    /// English text.
    pub en: String,
    /// The rule that fired, when there is one (an invariant key such as `R2152`, or a profile URL).
    pub rule: Option<String>,
}

impl Issue {
    /// A new issue.
    pub fn new(
        severity: Severity,
        code: &'static str,
        expression: impl Into<String>,
        ja: impl Into<String>,
        en: impl Into<String>,
    ) -> Issue {
        Issue {
            severity,
            code,
            expression: expression.into(),
            ja: ja.into(),
            en: en.into(),
            rule: None,
        }
    }

    /// Names the rule behind the issue.
    pub fn with_rule(mut self, rule: impl Into<String>) -> Issue {
        self.rule = Some(rule.into());
        self
    }
}

/// A list of issues, renderable as a FHIR OperationOutcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OperationOutcome {
    /// The issues, in the order found.
    pub issues: Vec<Issue>,
}

impl OperationOutcome {
    /// An outcome with one issue.
    pub fn single(issue: Issue) -> OperationOutcome {
        OperationOutcome {
            issues: vec![issue],
        }
    }

    /// True when any issue is an error or fatal.
    pub fn has_errors(&self) -> bool {
        self.issues.iter().any(|i| i.severity <= Severity::Error)
    }

    /// Number of errors (including fatal).
    pub fn error_count(&self) -> usize {
        self.issues
            .iter()
            .filter(|i| i.severity <= Severity::Error)
            .count()
    }

    /// Number of warnings.
    pub fn warning_count(&self) -> usize {
        self.issues
            .iter()
            .filter(|i| i.severity == Severity::Warning)
            .count()
    }

    /// The FHIR JSON form.
    pub fn to_fhir(&self) -> Value {
        let issues: Vec<Value> = if self.issues.is_empty() {
            vec![json!({
                "severity": "information",
                "code": "informational",
                "details": {"text": "問題はありません / No issues detected"}
            })]
        } else {
            self.issues
                .iter()
                .map(|i| {
                    let mut v = json!({
                        "severity": i.severity.as_str(),
                        "code": i.code,
                        "details": {"text": format!("{} / {}", i.ja, i.en)},
                        "diagnostics": i.en,
                    });
                    if !i.expression.is_empty() {
                        v["expression"] = json!([i.expression]);
                    }
                    if let Some(r) = &i.rule {
                        v["details"]["coding"] =
                            json!([{"system": "urn:kizuna:validation-rule", "code": r}]);
                    }
                    v
                })
                .collect()
        };
        json!({"resourceType": "OperationOutcome", "issue": issues})
    }
}
