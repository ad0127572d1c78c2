"""Query instructions FlagEmbedding's evaluations give BGE models with ``use_special_instructions``:
per MTEB / C-MTEB task (by task type and name) and per BRIGHT dataset (short and long documents).

Pure data plus look-ups; no model or benchmark package is imported here.
"""

from __future__ import annotations

#: MTEB task types whose every task gets one instruction.
MTEB_TYPE_INSTRUCTIONS = {
    "STS": "Retrieve semantically similar text.",
    "Summarization": "Given a news summary, retrieve other semantically similar summaries.",
    "BitextMining": "Retrieve parallel sentences.",
}

_SAME_TEXT = "Retrieve semantically similar text."
_CN_WEB = "Given a Chinese search query, retrieve web passages that answer the question."
_CN_MED = "Given a Chinese community medical question, retrieve replies that best answer the question."
_WEB = "Given a web search query, retrieve relevant passages that answer the query."
_TWEETS = "Retrieve tweets that are semantically similar to the given tweet."

#: MTEB task type -> task name -> instruction (English MTEB and C-MTEB tasks).
MTEB_TASK_INSTRUCTIONS: dict[str, dict[str, str]] = {
    "Classification": {
        "AmazonCounterfactualClassification":
            "Classify a given Amazon customer review text as either counterfactual or not-counterfactual.",
        "AmazonPolarityClassification": "Classify Amazon reviews into positive or negative sentiment.",
        "AmazonReviewsClassification": "Classify the given Amazon review into its appropriate rating category.",
        "Banking77Classification": "Given a online banking query, find the corresponding intents.",
        "EmotionClassification": "Classify the emotion expressed in the given Twitter message into one of the six "
                                 "emotions: anger, fear, joy, love, sadness, and surprise.",
        "ImdbClassification": "Classify the sentiment expressed in the given movie review text from the IMDB dataset.",
        "MassiveIntentClassification": "Given a user utterance as query, find the user intents.",
        "MassiveScenarioClassification": "Given a user utterance as query, find the user scenarios.",
        "MTOPDomainClassification": "Classify the intent domain of the given utterance in task-oriented conversation.",
        "MTOPIntentClassification": "Classify the intent of the given utterance in task-oriented conversation.",
        "ToxicConversationsClassification": "Classify the given comments as either toxic or not toxic.",
        "TweetSentimentExtractionClassification":
            "Classify the sentiment of a given tweet as either positive, negative, or neutral.",
        "TNews": "Classify the fine-grained category of the given news title.",
        "IFlyTek": "Given an App description text, find the appropriate fine-grained category.",
        "MultilingualSentiment": "Classify sentiment of the customer review into positive, neutral, or negative.",
        "JDReview": "Classify the customer review for iPhone on e-commerce platform into positive or negative.",
        "OnlineShopping": "Classify the customer review for online shopping into positive or negative.",
        "Waimai": "Classify the customer review from a food takeaway platform into positive or negative.",
    },
    "Clustering": {
        "ArxivClusteringP2P": "Identify the main and secondary category of Arxiv papers based on the titles and abstracts.",
        "ArxivClusteringS2S": "Identify the main and secondary category of Arxiv papers based on the titles.",
        "BiorxivClusteringP2P": "Identify the main category of Biorxiv papers based on the titles and abstracts.",
        "BiorxivClusteringS2S": "Identify the main category of Biorxiv papers based on the titles.",
        "MedrxivClusteringP2P": "Identify the main category of Medrxiv papers based on the titles and abstracts.",
        "MedrxivClusteringS2S": "Identify the main category of Medrxiv papers based on the titles.",
        "RedditClustering": "Identify the topic or theme of Reddit posts based on the titles.",
        "RedditClusteringP2P": "Identify the topic or theme of Reddit posts based on the titles and posts.",
        "StackExchangeClustering": "Identify the topic or theme of StackExchange posts based on the titles.",
        "StackExchangeClusteringP2P": "Identify the topic or theme of StackExchange posts based on the given paragraphs.",
        "TwentyNewsgroupsClustering": "Identify the topic or theme of the given news articles.",
        "CLSClusteringS2S": "Identify the main category of scholar papers based on the titles.",
        "CLSClusteringP2P": "Identify the main category of scholar papers based on the titles and abstracts.",
        "ThuNewsClusteringS2S": "Identify the topic or theme of the given news articles based on the titles.",
        "ThuNewsClusteringP2P": "Identify the topic or theme of the given news articles based on the titles and contents.",
    },
    # Reranking and PairClassification share one table.
    "Reranking": {
        "AskUbuntuDupQuestions": "Retrieve duplicate questions from AskUbuntu forum.",
        "MindSmallReranking": "Retrieve relevant news articles based on user browsing history.",
        "SciDocsRR": "Given a title of a scientific paper, retrieve the titles of other relevant papers.",
        "StackOverflowDupQuestions": "Retrieve duplicate questions from StackOverflow forum.",
        "SprintDuplicateQuestions": "Retrieve duplicate questions from Sprint forum.",
        "TwitterSemEval2015": _TWEETS,
        "TwitterURLCorpus": _TWEETS,
        "T2Reranking": _CN_WEB,
        "MMarcoReranking": _CN_WEB,
        "CMedQAv1": _CN_MED,
        "CMedQAv2": _CN_MED,
        "Ocnli": _SAME_TEXT,
        "Cmnli": _SAME_TEXT,
    },
    "Retrieval": {
        "ArguAna": "Given a claim, find documents that refute the claim.",
        "ClimateFEVER": "Given a claim about climate change, retrieve documents that support or refute the claim.",
        "DBPedia": "Given a query, retrieve relevant entity descriptions from DBPedia.",
        "FEVER": "Given a claim, retrieve documents that support or refute the claim.",
        "FiQA2018": "Given a financial question, retrieve user replies that best answer the question.",
        "HotpotQA": "Given a multi-hop question, retrieve documents that can help answer the question.",
        "MSMARCO": _WEB,
        "NFCorpus": "Given a question, retrieve relevant documents that best answer the question.",
        "NQ": "Given a question, retrieve Wikipedia passages that answer the question.",
        "QuoraRetrieval": "Given a question, retrieve questions that are semantically equivalent to the given question.",
        "SCIDOCS": "Given a scientific paper title, retrieve paper abstracts that are cited by the given paper.",
        "SciFact": "Given a scientific claim, retrieve documents that support or refute the claim.",
        "Touche2020": "Given a question, retrieve detailed and persuasive arguments that answer the question.",
        "TRECCOVID": "Given a query on COVID-19, retrieve documents that answer the query.",
        "T2Retrieval": _CN_WEB,
        "MMarcoRetrieval": _WEB,
        "DuRetrieval": _CN_WEB,
        "CovidRetrieval": "Given a question on COVID-19, retrieve news articles that answer the question.",
        "CmedqaRetrieval": _CN_MED,
        "EcomRetrieval": "Given a user query from an e-commerce website, retrieve description sentences of relevant "
                         "products.",
        "MedicalRetrieval": "Given a medical question, retrieve user replies that best answer the question.",
        "VideoRetrieval": "Given a video search query, retrieve the titles of relevant videos.",
    },
}
MTEB_TASK_INSTRUCTIONS["PairClassification"] = MTEB_TASK_INSTRUCTIONS["Reranking"]

CQADUPSTACK_INSTRUCTION = ("Given a question, retrieve detailed question descriptions from Stackexchange that are "
                           "duplicates to the given question.")

# Retrieval look-ups also accept lower-case names and these BEIR spellings.
_RETRIEVAL_ALIASES = {"trec-covid": "TRECCOVID", "climate-fever": "ClimateFEVER", "dbpedia-entity": "DBPedia",
                      "webis-touche2020": "Touche2020", "fiqa": "FiQA2018", "quora": "QuoraRetrieval"}
MIRACL_INSTRUCTION = "Given a question, retrieve Wikipedia passages that answer the question."


def mteb_instruction(task_name: str, task_type: str) -> str | None:
    """The instruction for an MTEB task (None: the tables have none for it)."""
    if task_type in MTEB_TYPE_INSTRUCTIONS:
        return MTEB_TYPE_INSTRUCTIONS[task_type]
    table = MTEB_TASK_INSTRUCTIONS.get(task_type)
    if table is None:
        return None
    if task_type != "Retrieval":
        return table.get(task_name)
    if task_name.lower().startswith("cqadupstack"):
        return CQADUPSTACK_INSTRUCTION
    if task_name == "miracl":
        return MIRACL_INSTRUCTION
    if task_name in table:
        return table[task_name]
    lower = {k.lower(): v for k, v in table.items()}
    if task_name in lower:
        return lower[task_name]
    alias = _RETRIEVAL_ALIASES.get(task_name)
    return table[alias] if alias else None


def _bright(kind: str) -> dict[str, str]:
    post = {"biology": "a Biology", "earth_science": "an Earth Science", "economics": "an Economics",
            "psychology": "a Psychology", "robotics": "a Robotics", "stackoverflow": "a Stack Overflow",
            "sustainable_living": "a Sustainable Living"}
    table = {name: f"Given {what} post, retrieve relevant {kind} that help answer the post." for name, what in post.items()}
    table["pony"] = f"Given a Pony question, retrieve relevant {kind} that help answer the question."
    return table


#: BRIGHT, short documents: dataset -> instruction.
BRIGHT_SHORT_INSTRUCTIONS = {
    **_bright("passages"),
    "leetcode": "Given a Coding problem, retrieve relevant examples that help answer the problem.",
    "aops": "Given a Math problem, retrieve relevant examples that help answer the problem.",
    "theoremqa_questions": "Given a Math problem, retrieve relevant examples that help answer the problem.",
    "theoremqa_theorems": "Given a Math problem, retrieve relevant theorems that help answer the problem.",
}
#: BRIGHT, long documents (FlagEmbedding's pony entry has no final full stop).
BRIGHT_LONG_INSTRUCTIONS = {
    **_bright("documents"),
    "pony": "Given a Pony question, retrieve relevant documents that help answer the question",
}
