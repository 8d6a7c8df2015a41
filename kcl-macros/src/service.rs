//! `kcl::service!(handle, option = value, …)`: a `main` that runs `kcl::service::Service`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Token};

/// The options, and the `Service` method each one calls.
const OPTIONS: [(&str, &str); 4] = [
    ("app", "default_app"),
    ("stream", "default_stream"),
    ("table", "default_table"),
    ("position", "default_position"),
];

pub(crate) fn expand(input: TokenStream) -> TokenStream {
    match expand_inner(input) {
        Ok(out) => out,
        Err(e) => {
            // An empty `main` too, so the error is the only one.
            let mut out = e.to_compile_error();
            out.extend(quote!(
                fn main() {}
            ));
            out
        }
    }
}

fn expand_inner(input: TokenStream) -> syn::Result<TokenStream> {
    let usage = "kcl::service! takes the name of a #[kcl::handler] function, then options: \
                 `kcl::service!(handle)` or `kcl::service!(handle, app = \"orders-app\")`";
    let exprs = Punctuated::<Expr, Token![,]>::parse_terminated.parse2(input)?;
    let mut exprs = exprs.into_iter();
    let handler = match exprs.next() {
        Some(Expr::Path(p)) if p.qself.is_none() && p.attrs.is_empty() => p.path,
        Some(other) => return Err(syn::Error::new_spanned(other, usage)),
        None => return Err(syn::Error::new(Span::call_site(), usage)),
    };
    let mut calls = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    for expr in exprs {
        let Expr::Assign(assign) = &expr else {
            return Err(syn::Error::new_spanned(
                &expr,
                "expected `option = value`; the options are `app`, `stream`, `table` (default \
                 values of --app, --stream, --table) and `position` (a kcl::InitialPosition)",
            ));
        };
        let key = match &*assign.left {
            Expr::Path(p) => p.path.get_ident().map(ToString::to_string),
            _ => None,
        };
        let Some(key) = key else {
            return Err(syn::Error::new_spanned(
                &assign.left,
                "expected an option name",
            ));
        };
        let Some((_, method)) = OPTIONS.iter().find(|(k, _)| *k == key) else {
            return Err(syn::Error::new_spanned(
                &assign.left,
                format!("unknown option `{key}`: expected `app`, `stream`, `table` or `position`"),
            ));
        };
        if seen.contains(&key) {
            return Err(syn::Error::new_spanned(
                &assign.left,
                format!("`{key}` is given twice"),
            ));
        }
        seen.push(key);
        let method = syn::Ident::new(method, assign.left.span());
        let value = &assign.right;
        calls.push(quote!(.#method(#value)));
    }
    let factory = quote_spanned! {handler.span()=> #handler::factory()};
    Ok(quote! {
        fn main() -> ::std::process::ExitCode {
            let program = match ::core::option_env!("CARGO_BIN_NAME") {
                ::core::option::Option::Some(name) => name,
                ::core::option::Option::None => ::core::env!("CARGO_PKG_NAME"),
            };
            ::kcl::service::Service::new(#factory)
                .program(program, ::core::env!("CARGO_PKG_VERSION"))
                #(#calls)*
                .run()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expanded(input: TokenStream) -> String {
        expand(input).to_string()
    }

    #[test]
    fn options_become_service_defaults() {
        let out = expanded(quote!(
            handlers::orders,
            app = "orders-app",
            stream = name(),
            table = "t",
            position = kcl::InitialPosition::Latest,
        ));
        for needle in [
            "fn main () -> :: std :: process :: ExitCode",
            ":: kcl :: service :: Service :: new (handlers :: orders :: factory ())",
            ". program (program , :: core :: env ! (\"CARGO_PKG_VERSION\"))",
            ". default_app (\"orders-app\")",
            ". default_stream (name ())",
            ". default_table (\"t\")",
            ". default_position (kcl :: InitialPosition :: Latest)",
            ". run ()",
        ] {
            assert!(out.contains(needle), "{needle:?} not in {out}");
        }
    }

    #[test]
    fn mistakes_are_errors_and_main_still_exists() {
        for (input, message) in [
            (
                quote!(),
                "kcl::service! takes the name of a #[kcl::handler] function",
            ),
            (
                quote!("handle"),
                "kcl::service! takes the name of a #[kcl::handler] function",
            ),
            (
                quote!(handle, application = "x"),
                "unknown option `application`",
            ),
            (quote!(handle, app = "x", app = "y"), "`app` is given twice"),
            (quote!(handle, "x"), "expected `option = value`"),
        ] {
            let out = expanded(input);
            assert!(out.contains("compile_error"), "{out}");
            assert!(out.contains(message), "{message:?} not in {out}");
            assert!(out.contains("fn main () { }"), "{out}");
        }
    }
}
