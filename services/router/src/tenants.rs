//! `[[tenants]]`: per-tenant settings; for now the tenant's hard budget.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// One tenant's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub name: String,
    /// The most the tenant's calls may cost in total, in micro-USD (1 USD = 1000000). Unset:
    /// no tenant budget (run and task budgets named by requests still apply).
    #[serde(default)]
    pub budget_micros: Option<u64>,
}

/// The tenant limits for [`crate::budget::Budgets::set_tenant_limits`].
pub fn limits(tenants: &[TenantConfig]) -> Vec<(String, Option<u64>)> {
    tenants
        .iter()
        .map(|tenant| (tenant.name.clone(), tenant.budget_micros))
        .collect()
}

/// Problems with `tenants`, as `tenants[i] ("name"): …` lines.
pub fn validate(tenants: &[TenantConfig], problems: &mut Vec<String>) {
    let mut seen = HashSet::new();
    for (index, tenant) in tenants.iter().enumerate() {
        let label = format!("tenants[{index}] ({:?})", tenant.name);
        if tenant.name.trim().is_empty() {
            problems.push(format!("{label}.name: must not be empty"));
        }
        if !seen.insert(tenant.name.as_str()) {
            problems.push(format!("{label}: the name is used by another tenant"));
        }
        // The database stores micro-USD as bigint.
        if tenant
            .budget_micros
            .is_some_and(|b| i64::try_from(b).is_err())
        {
            problems.push(format!("{label}.budget_micros: at most {}", i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_and_empty_names_are_reported() {
        let tenants = [
            TenantConfig {
                name: "acme".into(),
                budget_micros: Some(5_000_000),
            },
            TenantConfig {
                name: "acme".into(),
                budget_micros: None,
            },
            TenantConfig {
                name: " ".into(),
                budget_micros: None,
            },
        ];
        let mut problems = Vec::new();
        validate(&tenants, &mut problems);
        assert_eq!(
            problems,
            [
                "tenants[1] (\"acme\"): the name is used by another tenant",
                "tenants[2] (\" \").name: must not be empty",
            ]
        );
        assert_eq!(
            limits(&tenants[..1]),
            [("acme".to_owned(), Some(5_000_000))]
        );
    }
}
