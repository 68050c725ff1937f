"""Deterministic sample prompts for the demo: the questions a brand tracks in LLM answers.

"Prompt tracking" asks models the questions customers ask ("what is the best CRM for a small
agency?") and records which brands the answers mention. ``generate(n)`` builds *n* such
prompts from templates, categories, brands, audiences and markets with a fixed seed, so prompt
``demo-00042`` is the same on every machine and for every *n*; no two prompts are the same.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SEED = 20_240_601

# category: (plural noun, brands and one of their products, typical needs)
_CATEGORIES: dict[str, tuple[str, list[tuple[str, str]], list[str]]] = {
    "crm": (
        "CRM platforms",
        [
            ("Salesforce", "Salesforce Sales Cloud"),
            ("HubSpot", "HubSpot Sales Hub"),
            ("Pipedrive", "Pipedrive"),
            ("Zoho", "Zoho CRM"),
            ("Microsoft", "Microsoft Dynamics 365 Sales"),
            ("Freshworks", "Freshsales"),
        ],
        ["pipeline automation", "email tracking", "a low price per seat", "good reporting"],
    ),
    "project-management": (
        "project management tools",
        [
            ("Asana", "Asana"),
            ("Atlassian", "Jira"),
            ("monday.com", "monday Work Management"),
            ("Notion", "Notion Projects"),
            ("ClickUp", "ClickUp"),
            ("Trello", "Trello"),
        ],
        ["Gantt charts", "time tracking", "client portals", "agile sprints"],
    ),
    "running-shoes": (
        "running shoes",
        [
            ("Nike", "Nike Pegasus 41"),
            ("Adidas", "Adidas Ultraboost"),
            ("ASICS", "ASICS Gel-Kayano"),
            ("Hoka", "Hoka Clifton 9"),
            ("Brooks", "Brooks Ghost 16"),
            ("New Balance", "New Balance Fresh Foam 1080"),
        ],
        ["flat feet", "marathon training", "trail running", "wide feet"],
    ),
    "smartphones": (
        "smartphones",
        [
            ("Apple", "iPhone 16"),
            ("Samsung", "Samsung Galaxy S24"),
            ("Google", "Google Pixel 9"),
            ("Xiaomi", "Xiaomi 14"),
            ("OnePlus", "OnePlus 12"),
            ("Motorola", "Motorola Edge 50"),
        ],
        ["battery life", "camera quality", "long software support", "a compact size"],
    ),
    "neobanks": (
        "digital banks",
        [
            ("Revolut", "Revolut Standard"),
            ("N26", "N26 Smart"),
            ("Wise", "Wise account"),
            ("Monzo", "Monzo Perks"),
            ("Nubank", "NuConta"),
            ("bunq", "bunq Easy Money"),
        ],
        ["low foreign exchange fees", "a good mobile app", "savings interest", "joint accounts"],
    ),
    "email-marketing": (
        "email marketing platforms",
        [
            ("Mailchimp", "Mailchimp Standard"),
            ("Klaviyo", "Klaviyo Email"),
            ("Brevo", "Brevo Business"),
            ("ActiveCampaign", "ActiveCampaign Plus"),
            ("Kit", "Kit Creator"),
            ("MailerLite", "MailerLite Growing Business"),
        ],
        ["e-commerce automations", "deliverability", "a free plan", "A/B testing"],
    ),
    "coffee-machines": (
        "espresso machines",
        [
            ("De'Longhi", "De'Longhi Dedica"),
            ("Breville", "Breville Barista Express"),
            ("Nespresso", "Nespresso Vertuo"),
            ("Philips", "Philips LatteGo 3200"),
            ("Gaggia", "Gaggia Classic Pro"),
            ("Sage", "Sage Bambino Plus"),
        ],
        ["milk drinks", "easy cleaning", "a small kitchen", "bean-to-cup convenience"],
    ),
    "password-managers": (
        "password managers",
        [
            ("1Password", "1Password Families"),
            ("Bitwarden", "Bitwarden Premium"),
            ("Dashlane", "Dashlane Premium"),
            ("Proton", "Proton Pass"),
            ("Keeper", "Keeper Unlimited"),
            ("NordPass", "NordPass Premium"),
        ],
        ["family sharing", "passkeys", "an open-source codebase", "business SSO"],
    ),
    "electric-cars": (
        "electric cars",
        [
            ("Tesla", "Tesla Model 3"),
            ("BYD", "BYD Seal"),
            ("Volkswagen", "Volkswagen ID.3"),
            ("Kia", "Kia EV6"),
            ("Hyundai", "Hyundai Ioniq 5"),
            ("Renault", "Renault Megane E-Tech"),
        ],
        ["long range", "fast charging", "a family budget", "low running costs"],
    ),
    "web-hosting": (
        "web hosting providers",
        [
            ("Bluehost", "Bluehost Basic"),
            ("SiteGround", "SiteGround GrowBig"),
            ("Hostinger", "Hostinger Premium"),
            ("DigitalOcean", "DigitalOcean Droplets"),
            ("Cloudflare", "Cloudflare Pages"),
            ("WP Engine", "WP Engine Startup"),
        ],
        ["WordPress", "uptime", "customer support", "a cheap first year"],
    ),
}

_AUDIENCES = [
    "a small business",
    "a freelancer",
    "a 50-person remote team",
    "a student",
    "a family of four",
    "a startup",
    "a nonprofit",
    "a beginner",
    "an enterprise IT team",
]
_MARKETS = [
    ("us", "the United States"),
    ("uk", "the United Kingdom"),
    ("es", "Spain"),
    ("mx", "Mexico"),
    ("de", "Germany"),
    ("br", "Brazil"),
    ("in", "India"),
    ("fr", "France"),
]
_YEARS = ["2024", "2025"]

_TEMPLATES = [
    "What are the best {plural} for {audience} in {year}? List your top 5 with one reason each.",
    "How does {brand} compare to {rival} for {need}? Give a short verdict.",
    "Is {product} a good choice for {audience} who cares about {need}?",
    "Which {plural} would you recommend in {market} and why?",
    "What do customers most often complain about with {product}?",
    "Name three alternatives to {product} for {need}.",
    "I'm {audience} looking for {plural} with {need}. What should I choose?",
    "Summarize the reputation of {brand} among {plural} in {market}.",
    "Rank {brand}, {rival} and {third} on {need}, from best to worst.",
    "What is the most trusted brand of {plural} in {year}, and what makes it stand out?",
    "Write a balanced pros and cons list for {product}.",
    "If you had to pick one of {plural} for {audience}, would it be {brand} or {rival}?",
]

# How the asker wants the answer; multiplies the variety of the questions above.
_STYLES = [
    "",
    " Keep it under 100 words.",
    " Mention prices if you know them.",
    " Answer as a bulleted list.",
    " Be honest about the downsides.",
    " Cite what reviewers usually say.",
    " Answer in two sentences.",
    " Explain it to someone who is not technical.",
]


@dataclass(frozen=True)
class SamplePrompt:
    external_id: str
    text: str
    tags: tuple[str, ...]
    metadata: dict[str, Any]

    def to_json(self, *, active: bool = True) -> dict[str, Any]:
        return {
            "id": self.external_id,
            "text": self.text,
            "tags": list(self.tags),
            "active": active,
            "metadata": self.metadata,
        }


def generate(n: int) -> Iterator[SamplePrompt]:
    """The first *n* sample prompts, all different; the same on every machine and for every
    *n* (prompt ``demo-00042`` is always the same question)."""
    rng = random.Random(SEED)
    seen: set[str] = set()
    categories = sorted(_CATEGORIES)
    i = 0
    while i < n:
        category = rng.choice(categories)
        plural, brands, needs = _CATEGORIES[category]
        (brand, product), (rival, _), (third, _) = rng.sample(brands, 3)
        code, market = rng.choice(_MARKETS)
        values = {
            "plural": plural,
            "brand": brand,
            "product": product,
            "rival": rival,
            "third": third,
            "need": rng.choice(needs),
            "audience": rng.choice(_AUDIENCES),
            "market": market,
            "year": rng.choice(_YEARS),
        }
        text = rng.choice(_TEMPLATES).format(**values) + rng.choice(_STYLES)
        if text in seen:
            continue
        seen.add(text)
        yield SamplePrompt(
            external_id=f"demo-{i:05d}",
            text=text,
            tags=("demo", category, f"market-{code}"),
            metadata={"category": category, "brand": brand, "market": code},
        )
        i += 1
