"""Dependencies as ``Annotated`` aliases: routes declare what they need, the app state provides it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from integration.bootstrap import Engine
from integration.config import Settings
from integration.services.context import Services


def get_engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(get_engine)]


def get_settings(engine: EngineDep) -> Settings:
    return engine.settings


def get_services(engine: EngineDep) -> Services:
    return engine.services


def get_sessions(engine: EngineDep) -> sessionmaker[Session]:
    sessions: sessionmaker[Session] = engine.store.sessions
    return sessions


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServicesDep = Annotated[Services, Depends(get_services)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]


@dataclass(frozen=True)
class Paging:
    offset: int
    limit: int


def get_paging(
    offset: Annotated[int, Query(ge=0, le=1_000_000_000, description="Items to skip")] = 0,  # SQL needs a bound
    limit: Annotated[int, Query(ge=1, le=500, description="Items per page")] = 50,
) -> Paging:
    return Paging(offset, limit)


PagingDep = Annotated[Paging, Depends(get_paging)]
