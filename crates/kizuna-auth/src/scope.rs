//! SMART App Launch v2 scopes (`patient/Observation.rs`, `user/*.cruds`, `system/*.read` …), v1 forms
//! accepted, and the permission each FHIR interaction needs.

use std::fmt;

use serde::Serialize;

/// Whose data a scope reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Context {
    /// Only the data of the patient in context (the principal's own person for a patient).
    Patient,
    /// What the user may see (decided further by the access policy).
    User,
    /// A backend system acting on its own behalf.
    System,
}

/// The five SMART v2 permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Permissions {
    /// create
    pub c: bool,
    /// read
    pub r: bool,
    /// update
    pub u: bool,
    /// delete
    pub d: bool,
    /// search
    pub s: bool,
}

impl Permissions {
    /// Whether `p` is granted.
    pub fn has(&self, p: Permission) -> bool {
        match p {
            Permission::Create => self.c,
            Permission::Read => self.r,
            Permission::Update => self.u,
            Permission::Delete => self.d,
            Permission::Search => self.s,
        }
    }
}

/// One permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// c
    Create,
    /// r
    Read,
    /// u
    Update,
    /// d
    Delete,
    /// s
    Search,
}

impl Permission {
    /// The SMART letter.
    pub fn letter(self) -> char {
        match self {
            Permission::Create => 'c',
            Permission::Read => 'r',
            Permission::Update => 'u',
            Permission::Delete => 'd',
            Permission::Search => 's',
        }
    }
}

/// A FHIR REST interaction, as the API sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Interaction {
    /// POST [type]
    Create,
    /// GET [type]/[id]
    Read,
    /// GET [type]/[id]/_history/[vid]
    Vread,
    /// PUT [type]/[id]
    Update,
    /// PATCH [type]/[id]
    Patch,
    /// DELETE [type]/[id]
    Delete,
    /// GET/POST [type]?…
    Search,
    /// GET [type]/[id]/_history, [type]/_history, _history
    History,
    /// `$name` operations; `read_only` ones need read, others write.
    Operation {
        /// The operation name without `$`.
        name: String,
        /// True for operations that only read (`$everything`, `$summary`, `$export`, `$validate`).
        read_only: bool,
    },
}

impl Interaction {
    /// The permissions the interaction needs (all of them).
    pub fn needs(&self) -> &'static [Permission] {
        match self {
            Interaction::Create => &[Permission::Create],
            Interaction::Read | Interaction::Vread => &[Permission::Read],
            Interaction::Update | Interaction::Patch => &[Permission::Update],
            Interaction::Delete => &[Permission::Delete],
            Interaction::Search | Interaction::History => &[Permission::Search],
            Interaction::Operation {
                read_only: true, ..
            } => &[Permission::Read],
            Interaction::Operation {
                read_only: false, ..
            } => &[Permission::Create, Permission::Update],
        }
    }

    /// A short name for audit (`read`, `search`, `$everything` …).
    pub fn name(&self) -> String {
        match self {
            Interaction::Create => "create".into(),
            Interaction::Read => "read".into(),
            Interaction::Vread => "vread".into(),
            Interaction::Update => "update".into(),
            Interaction::Patch => "patch".into(),
            Interaction::Delete => "delete".into(),
            Interaction::Search => "search".into(),
            Interaction::History => "history".into(),
            Interaction::Operation { name, .. } => format!("${name}"),
        }
    }
}

/// A parsed resource scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scope {
    /// patient / user / system.
    pub context: Context,
    /// Resource type, `None` for `*`.
    pub resource: Option<String>,
    /// Granted permissions.
    pub permissions: Permissions,
    /// SMART v2 granular restrictions (`?category=laboratory`), to be applied to results.
    pub params: Vec<(String, String)>,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ctx = match self.context {
            Context::Patient => "patient",
            Context::User => "user",
            Context::System => "system",
        };
        let p = &self.permissions;
        let perms: String = [(p.c, 'c'), (p.r, 'r'), (p.u, 'u'), (p.d, 'd'), (p.s, 's')]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, c)| *c)
            .collect();
        write!(
            f,
            "{ctx}/{}.{perms}",
            self.resource.as_deref().unwrap_or("*")
        )?;
        for (i, (k, v)) in self.params.iter().enumerate() {
            write!(f, "{}{k}={v}", if i == 0 { '?' } else { '&' })?;
        }
        Ok(())
    }
}

/// Why a scope string was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("スコープが不正です / invalid scope {0:?}")]
pub struct ScopeError(pub String);

fn is_resource_name(s: &str) -> bool {
    s == "*"
        || (s.starts_with(|c: char| c.is_ascii_uppercase())
            && s.chars().all(|c| c.is_ascii_alphanumeric()))
}

impl Scope {
    /// Parses one resource scope. `None` for non-resource scopes (`openid`, `launch/patient` …).
    pub fn parse(s: &str) -> Result<Option<Scope>, ScopeError> {
        let err = || ScopeError(s.to_string());
        let Some((ctx, rest)) = s.split_once('/') else {
            return Ok(None);
        };
        let context = match ctx {
            "patient" => Context::Patient,
            "user" => Context::User,
            "system" => Context::System,
            _ => return Ok(None),
        };
        let Some((resource, perm_part)) = rest.split_once('.') else {
            // `launch/patient` and friends.
            return if is_resource_name(rest) {
                Err(err())
            } else {
                Ok(None)
            };
        };
        if !is_resource_name(resource) {
            return Err(err());
        }
        let (perm, query) = match perm_part.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (perm_part, None),
        };
        let permissions = match perm {
            // SMART v1.
            "read" => Permissions {
                r: true,
                s: true,
                ..Permissions::default()
            },
            "write" => Permissions {
                c: true,
                u: true,
                d: true,
                ..Permissions::default()
            },
            "*" => Permissions {
                c: true,
                r: true,
                u: true,
                d: true,
                s: true,
            },
            v2 => {
                // c, r, u, d, s — each at most once, in this order.
                let mut p = Permissions::default();
                let mut last = 0;
                for ch in v2.chars() {
                    let pos = match ch {
                        'c' => 1,
                        'r' => 2,
                        'u' => 3,
                        'd' => 4,
                        's' => 5,
                        _ => return Err(err()),
                    };
                    if pos <= last {
                        return Err(err());
                    }
                    last = pos;
                    match ch {
                        'c' => p.c = true,
                        'r' => p.r = true,
                        'u' => p.u = true,
                        'd' => p.d = true,
                        _ => p.s = true,
                    }
                }
                if last == 0 {
                    return Err(err());
                }
                p
            }
        };
        let mut params = Vec::new();
        if let Some(q) = query {
            if query.is_some() && matches!(perm, "read" | "write" | "*") {
                return Err(err());
            }
            for pair in q.split('&') {
                let (k, v) = pair.split_once('=').ok_or_else(err)?;
                if k.is_empty() || v.is_empty() {
                    return Err(err());
                }
                params.push((k.to_string(), v.to_string()));
            }
        }
        Ok(Some(Scope {
            context,
            resource: if resource == "*" {
                None
            } else {
                Some(resource.to_string())
            },
            permissions,
            params,
        }))
    }

    fn covers(&self, resource_type: &str, p: Permission) -> bool {
        self.permissions.has(p)
            && self
                .resource
                .as_deref()
                .map(|r| r == resource_type)
                .unwrap_or(true)
    }
}

/// What a token may do: its resource scopes and the others (`openid`, `fhirUser`, `launch/patient` …).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ScopeSet {
    /// Resource scopes.
    pub scopes: Vec<Scope>,
    /// Other scopes, kept as given.
    pub other: Vec<String>,
}

/// The scope that allowed an interaction: its context and any granular restrictions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Grant {
    /// The context of the allowing scope (the widest one that allows).
    pub context: Context,
    /// Granular restrictions that results must meet.
    pub restrictions: Vec<(String, String)>,
    /// The allowing scope, as text (for audit).
    pub scope: String,
}

impl ScopeSet {
    /// Parses a space-separated `scope` claim. Unknown non-resource scopes are kept; malformed resource
    /// scopes are an error (a token must not be half-understood).
    pub fn parse(s: &str) -> Result<ScopeSet, ScopeError> {
        let mut set = ScopeSet::default();
        for part in s.split_whitespace() {
            match Scope::parse(part)? {
                Some(sc) => set.scopes.push(sc),
                None => set.other.push(part.to_string()),
            }
        }
        Ok(set)
    }

    /// Which scope (widest context first; unrestricted before restricted) allows `interaction` on
    /// `resource_type`, or `None`.
    pub fn grant(&self, resource_type: &str, interaction: &Interaction) -> Option<Grant> {
        let needs = interaction.needs();
        let mut best: Option<&Scope> = None;
        for sc in &self.scopes {
            if !needs.iter().all(|p| sc.covers(resource_type, *p)) {
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => (sc.context, sc.params.is_empty()) > (b.context, b.params.is_empty()),
            };
            if better {
                best = Some(sc);
            }
        }
        best.map(|sc| Grant {
            context: sc.context,
            restrictions: sc.params.clone(),
            scope: sc.to_string(),
        })
    }

    /// The widest scope allowing a read of some type: enough to poll and download one's own bulk
    /// export, whose types were checked when it started.
    pub fn grant_any_read(&self) -> Option<Grant> {
        self.scopes
            .iter()
            .filter(|sc| sc.permissions.has(Permission::Read))
            .filter_map(|sc| self.grant(sc.resource.as_deref().unwrap_or("*"), &Interaction::Read))
            .max_by_key(|g| g.context)
    }

    /// The scope text that would be needed, for a 403 message.
    pub fn needed(resource_type: &str, interaction: &Interaction) -> String {
        let letters: String = interaction.needs().iter().map(|p| p.letter()).collect();
        format!("user/{resource_type}.{letters}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_v2_v1_and_granular_scopes() {
        let s = ScopeSet::parse("openid fhirUser launch/patient patient/Observation.rs user/*.cruds system/Patient.read patient/Observation.rs?category=laboratory")
            .unwrap_or_default();
        assert_eq!(s.scopes.len(), 4);
        assert_eq!(s.other, vec!["openid", "fhirUser", "launch/patient"]);
        assert_eq!(
            s.scopes[2].permissions,
            Permissions {
                r: true,
                s: true,
                ..Permissions::default()
            }
        );
        assert_eq!(
            s.scopes[3].params,
            vec![("category".to_string(), "laboratory".to_string())]
        );
        assert_eq!(
            s.scopes[3].to_string(),
            "patient/Observation.rs?category=laboratory"
        );
        for bad in [
            "patient/Observation.sr",
            "patient/Observation.rr",
            "patient/Observation.x",
            "patient/observation.rs",
            "user/Patient.",
            "patient/Observation.read?x=1",
            "user/*.rs?category",
        ] {
            assert!(ScopeSet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn grants_need_every_permission_and_the_type() {
        let s = ScopeSet::parse("patient/Observation.rs").unwrap_or_default();
        assert!(s.grant("Observation", &Interaction::Read).is_some());
        assert!(s.grant("Observation", &Interaction::Search).is_some());
        assert!(s.grant("Observation", &Interaction::Create).is_none());
        assert!(s.grant("Condition", &Interaction::Read).is_none());
        let s = ScopeSet::parse("patient/*.rs user/Observation.r").unwrap_or_default();
        assert_eq!(
            s.grant("Observation", &Interaction::Read)
                .map(|g| g.context),
            Some(Context::User)
        );
        assert_eq!(
            s.grant("Observation", &Interaction::Search)
                .map(|g| g.context),
            Some(Context::Patient)
        );
    }
}
