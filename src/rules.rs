//! Ref rules: which environments a branch or tag deploys to. Pure: the playbook's rules and a ref in,
//! environment names out. The first matching rule wins; a ref no rule matches deploys nothing.

use crate::known_hosts::glob_match;
use crate::playbook::Rule;

/// The environments for `ref_name`, or `None` when no rule matches.
pub fn select<'a>(rules: &'a [Rule], ref_name: &str, is_tag: bool) -> Option<&'a [String]> {
    rules
        .iter()
        .find(|r| {
            let pattern = if is_tag { &r.tag } else { &r.branch };
            pattern
                .as_deref()
                .is_some_and(|p| glob_match(p.as_bytes(), ref_name.as_bytes()))
        })
        .map(|r| r.deploy.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(branch: Option<&str>, tag: Option<&str>, deploy: &[&str]) -> Rule {
        Rule {
            branch: branch.map(Into::into),
            tag: tag.map(Into::into),
            deploy: deploy.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn first_match_wins_and_tags_are_separate() {
        let rules = vec![
            rule(Some("master"), None, &[]),
            rule(Some("release-*"), None, &["staging"]),
            rule(None, Some("v*"), &["publish"]),
        ];
        assert_eq!(
            select(&rules, "release-1.4", false),
            Some(&["staging".to_string()][..])
        );
        assert_eq!(select(&rules, "master", false), Some(&[][..]));
        assert_eq!(
            select(&rules, "v1.2.0", true),
            Some(&["publish".to_string()][..])
        );
        assert_eq!(select(&rules, "v1.2.0", false), None);
        assert_eq!(select(&rules, "release-1.4", true), None);
        assert_eq!(
            select(&rules, "release-$(touch /tmp/pwned)", false),
            Some(&["staging".to_string()][..])
        );
        assert_eq!(select(&rules, "feature/x", false), None);
    }
}
