//! `#[derive(Persist)]`: declares which fields of a serde type are mandatory and, for a top-level
//! record, its schema name and version.
//!
//! ```ignore
//! #[derive(Serialize, Deserialize, Persist)]
//! #[serde(rename_all = "PascalCase")]
//! #[persist(record = "SnapshotInstanceStatus", version = 1, plain_import)]
//! struct SnapshotInstanceStatus {
//!     #[persist(mandatory)]
//!     snapshot: SnapshotDesc,
//!     #[serde(rename = "AppInstanceID")]
//!     #[persist(mandatory)]
//!     app_instance_id: Uuid,
//! }
//! ```
//!
//! `readable_from = N` (default 1) on a record: the oldest version whose builds read this version
//! right. A version that only adds fields keeps it; one that changes what an existing field
//! means (its unit, its sense) sets it to itself, so older builds refuse the record by name
//! instead of misreading it.
//!
//! The generated `Schema` impl walks a `serde_json::Value` with the same key names serde uses
//! (`rename`, `rename_all`, `alias`, `flatten`, `skip` are honoured), so the mandatory check runs
//! on the raw document before deserialization and can name the exact path of a missing field.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::quote;
use syn::{Data, DeriveInput, Fields, LitInt, LitStr, parse_macro_input, spanned::Spanned};

#[proc_macro_derive(Persist, attributes(persist))]
pub fn derive_persist(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    match expand(&input) {
        Ok(tokens) => tokens.into(),
        Err(err) => err.to_compile_error().into(),
    }
}

#[derive(Default)]
struct ContainerAttrs {
    record: Option<LitStr>,
    version: Option<LitInt>,
    readable_from: Option<LitInt>,
    migrations: Option<syn::Path>,
    plain_import: bool,
    rename_all: Option<String>,
}

struct FieldInfo {
    key: String,
    aliases: Vec<String>,
    mandatory: bool,
    flatten: bool,
    ty: syn::Type,
}

fn expand(input: &DeriveInput) -> syn::Result<TokenStream2> {
    let attrs = container_attrs(input)?;
    let name = &input.ident;

    let mut generics = input.generics.clone();
    for param in generics.type_params_mut() {
        param
            .bounds
            .push(syn::parse_quote!(::cairn_persist::Schema));
    }
    let (impl_generics, ty_generics, where_clause) = generics.split_for_impl();

    let body = match &input.data {
        Data::Struct(data) => {
            let fields = struct_fields(&data.fields, attrs.rename_all.as_deref())?;
            check_body(&fields)
        }
        // Enums and unions carry no mandatory-field declarations: the type check at
        // deserialization covers them.
        Data::Enum(data) => {
            for variant in &data.variants {
                for field in &variant.fields {
                    if field_attrs(field)?.0 {
                        return Err(syn::Error::new(
                            field.span(),
                            "#[persist(mandatory)] is supported on struct fields only",
                        ));
                    }
                }
            }
            quote! { let _ = (value, path, missing); }
        }
        Data::Union(u) => {
            return Err(syn::Error::new(
                u.union_token.span(),
                "Persist cannot be derived for unions",
            ));
        }
    };

    let schema_impl = quote! {
        impl #impl_generics ::cairn_persist::Schema for #name #ty_generics #where_clause {
            fn check_mandatory(
                value: &::cairn_persist::serde_json::Value,
                path: &mut ::cairn_persist::FieldPath,
                missing: &mut ::std::vec::Vec<::std::string::String>,
            ) {
                #body
            }
        }
    };

    let record_impl = match (&attrs.record, &attrs.version) {
        (Some(record), Some(version)) => {
            let plain = attrs.plain_import;
            let readable_from = match &attrs.readable_from {
                Some(from) => {
                    if from.base10_parse::<u32>()? > version.base10_parse::<u32>()? {
                        return Err(syn::Error::new(
                            from.span(),
                            "`readable_from` cannot be newer than `version`",
                        ));
                    }
                    quote! { #from }
                }
                None => quote! { 1 },
            };
            let migrations = match &attrs.migrations {
                Some(path) => quote! { #path() },
                None => quote! { &[] },
            };
            quote! {
                impl #impl_generics ::cairn_persist::Record for #name #ty_generics #where_clause {
                    const SCHEMA: &'static str = #record;
                    const VERSION: u32 = #version;
                    const READABLE_FROM: u32 = #readable_from;
                    const PLAIN_IMPORT: bool = #plain;
                    fn migrations() -> &'static [::cairn_persist::Migration] {
                        #migrations
                    }
                }
            }
        }
        (None, None) => {
            if attrs.plain_import || attrs.migrations.is_some() || attrs.readable_from.is_some() {
                return Err(syn::Error::new(
                    input.ident.span(),
                    "`plain_import`, `readable_from` and `migrations` need `record = \"Name\"` and \
                     `version = N`",
                ));
            }
            quote! {}
        }
        _ => {
            return Err(syn::Error::new(
                input.ident.span(),
                "a record needs both `record = \"Name\"` and `version = N`",
            ));
        }
    };

    Ok(quote! { #schema_impl #record_impl })
}

fn check_body(fields: &[FieldInfo]) -> TokenStream2 {
    let checks = fields.iter().map(|field| {
        let ty = &field.ty;
        if field.flatten {
            // A flattened struct's keys live in this object, at this path.
            return quote! {
                <#ty as ::cairn_persist::Schema>::check_mandatory(value, path, missing);
            };
        }
        let key = &field.key;
        let aliases = &field.aliases;
        let recurse = quote! {
            path.push_key(#key);
            <#ty as ::cairn_persist::Schema>::check_mandatory(inner, path, missing);
            path.pop();
        };
        let lookup = quote! { ::cairn_persist::schema::lookup(object, #key, &[#(#aliases),*]) };
        if field.mandatory {
            quote! {
                match #lookup {
                    ::std::option::Option::Some(inner) => { #recurse }
                    ::std::option::Option::None => missing.push(path.child(#key)),
                }
            }
        } else {
            quote! {
                if let ::std::option::Option::Some(inner) = #lookup { #recurse }
            }
        }
    });
    quote! {
        // Not an object: the type error is reported by deserialization, with its path.
        let ::std::option::Option::Some(object) = value.as_object() else { return; };
        #(#checks)*
    }
}

fn struct_fields(fields: &Fields, rename_all: Option<&str>) -> syn::Result<Vec<FieldInfo>> {
    let mut out = Vec::new();
    match fields {
        Fields::Named(named) => {
            for field in &named.named {
                let (mandatory, serde) = field_attrs(field)?;
                if serde.skip {
                    if mandatory {
                        return Err(syn::Error::new(
                            field.span(),
                            "a skipped field cannot be mandatory",
                        ));
                    }
                    continue;
                }
                if serde.flatten && mandatory {
                    return Err(syn::Error::new(
                        field.span(),
                        "mark the fields inside a flattened struct mandatory, not the struct",
                    ));
                }
                let ident = field
                    .ident
                    .as_ref()
                    .map(|i| i.to_string())
                    .unwrap_or_default();
                let ident = ident.strip_prefix("r#").unwrap_or(&ident).to_string();
                let key = match serde.rename {
                    Some(rename) => rename,
                    None => apply_rename_all(&ident, rename_all)?,
                };
                out.push(FieldInfo {
                    key,
                    aliases: serde.aliases,
                    mandatory,
                    flatten: serde.flatten,
                    ty: field.ty.clone(),
                });
            }
        }
        Fields::Unnamed(unnamed) => {
            // A newtype struct is transparent for the check: serde reads it as its inner value.
            if unnamed.unnamed.len() == 1 {
                let field = &unnamed.unnamed[0];
                if field_attrs(field)?.0 {
                    return Err(syn::Error::new(
                        field.span(),
                        "#[persist(mandatory)] needs a named field",
                    ));
                }
            }
        }
        Fields::Unit => {}
    }
    Ok(out)
}

#[derive(Default)]
struct SerdeFieldAttrs {
    rename: Option<String>,
    aliases: Vec<String>,
    flatten: bool,
    skip: bool,
}

fn field_attrs(field: &syn::Field) -> syn::Result<(bool, SerdeFieldAttrs)> {
    let mut mandatory = false;
    let mut serde = SerdeFieldAttrs::default();
    for attr in &field.attrs {
        if attr.path().is_ident("persist") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("mandatory") {
                    mandatory = true;
                    Ok(())
                } else {
                    Err(meta.error("unknown persist field attribute; expected `mandatory`"))
                }
            })?;
        } else if attr.path().is_ident("serde") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename") {
                    if meta.input.peek(syn::Token![=]) {
                        let lit: LitStr = meta.value()?.parse()?;
                        serde.rename = Some(lit.value());
                    } else {
                        // rename(serialize = "..", deserialize = "..")
                        meta.parse_nested_meta(|inner| {
                            let lit: LitStr = inner.value()?.parse()?;
                            if inner.path.is_ident("deserialize") {
                                serde.rename = Some(lit.value());
                            }
                            Ok(())
                        })?;
                    }
                } else if meta.path.is_ident("alias") {
                    let lit: LitStr = meta.value()?.parse()?;
                    serde.aliases.push(lit.value());
                } else if meta.path.is_ident("flatten") {
                    serde.flatten = true;
                } else if meta.path.is_ident("skip") || meta.path.is_ident("skip_deserializing") {
                    serde.skip = true;
                } else {
                    skip_meta_value(&meta)?;
                }
                Ok(())
            })?;
        }
    }
    Ok((mandatory, serde))
}

fn container_attrs(input: &DeriveInput) -> syn::Result<ContainerAttrs> {
    let mut out = ContainerAttrs::default();
    for attr in &input.attrs {
        if attr.path().is_ident("persist") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("record") {
                    out.record = Some(meta.value()?.parse()?);
                } else if meta.path.is_ident("version") {
                    let version: LitInt = meta.value()?.parse()?;
                    if version.base10_parse::<u32>()? == 0 {
                        return Err(meta.error("versions start at 1"));
                    }
                    out.version = Some(version);
                } else if meta.path.is_ident("readable_from") {
                    let from: LitInt = meta.value()?.parse()?;
                    if from.base10_parse::<u32>()? == 0 {
                        return Err(meta.error("versions start at 1"));
                    }
                    out.readable_from = Some(from);
                } else if meta.path.is_ident("migrations") {
                    out.migrations = Some(meta.value()?.parse()?);
                } else if meta.path.is_ident("plain_import") {
                    out.plain_import = true;
                } else {
                    return Err(meta.error(
                        "unknown persist attribute; expected `record`, `version`, `readable_from`, \
                         `migrations` or `plain_import`",
                    ));
                }
                Ok(())
            })?;
        } else if attr.path().is_ident("serde") {
            attr.parse_nested_meta(|meta| {
                if meta.path.is_ident("rename_all") {
                    if meta.input.peek(syn::Token![=]) {
                        let lit: LitStr = meta.value()?.parse()?;
                        out.rename_all = Some(lit.value());
                    } else {
                        meta.parse_nested_meta(|inner| {
                            let lit: LitStr = inner.value()?.parse()?;
                            if inner.path.is_ident("deserialize") {
                                out.rename_all = Some(lit.value());
                            }
                            Ok(())
                        })?;
                    }
                } else {
                    skip_meta_value(&meta)?;
                }
                Ok(())
            })?;
        }
    }
    Ok(out)
}

/// Consumes the value of a serde attribute this derive does not interpret
/// (`default`, `with = ".."`, `skip_serializing_if = ".."`, `bound(..)`, ...).
fn skip_meta_value(meta: &syn::meta::ParseNestedMeta) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        let _: syn::Expr = meta.value()?.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        let content;
        syn::parenthesized!(content in meta.input);
        let _: TokenStream2 = content.parse()?;
    }
    Ok(())
}

/// serde's `rename_all` rules, applied to a Rust (snake_case) field name.
fn apply_rename_all(field: &str, rule: Option<&str>) -> syn::Result<String> {
    let words = field.split('_').filter(|w| !w.is_empty());
    let capitalize = |w: &str| {
        let mut chars = w.chars();
        match chars.next() {
            Some(first) => first.to_uppercase().collect::<String>() + chars.as_str(),
            None => String::new(),
        }
    };
    Ok(match rule {
        None | Some("snake_case") => field.to_string(),
        Some("PascalCase") => words.map(capitalize).collect(),
        Some("camelCase") => {
            let pascal: String = words.map(capitalize).collect();
            let mut chars = pascal.chars();
            match chars.next() {
                Some(first) => first.to_lowercase().collect::<String>() + chars.as_str(),
                None => String::new(),
            }
        }
        Some("lowercase") => field.to_lowercase(),
        Some("UPPERCASE") => field.to_uppercase(),
        Some("SCREAMING_SNAKE_CASE") => field.to_uppercase(),
        Some("kebab-case") => field.replace('_', "-"),
        Some("SCREAMING-KEBAB-CASE") => field.replace('_', "-").to_uppercase(),
        Some(other) => {
            return Err(syn::Error::new(
                proc_macro2::Span::call_site(),
                format!("unsupported serde rename_all rule `{other}`"),
            ));
        }
    })
}
